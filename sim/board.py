"""The simulated board: :class:`mmfree.hdl.top.AcceleratorTop` compiled with Verilator, its UART
pins bridged bit-accurately to a TCP socket on 127.0.0.1, so that the host library and
``mmfree run --port socket://127.0.0.1:PORT`` talk to the gateware exactly as to a board.

- :func:`build`: Amaranth → Verilog → ``verilator --cc --exe --build -O3`` with the C++ main of
  sim/verilator/ (main.cpp documents the line model, the idle sleep and the exit rules). The
  executable is cached under ``$MMFREE_CACHE/simboard`` (default ``~/.cache/mmfree/simboard``)
  by a hash of the Verilog, the C++ sources, the build flags, the Verilator version and the C++
  compiler version, so only a changed design is compiled again (15-40 s for the
  accelerator on two cores).
- :class:`SimBoard`: a running simulated board (one child process) behind a listening socket;
  ``url`` is its ``socket://`` URL, :meth:`SimBoard.close` stops it and returns its statistics.
- :func:`serve`: what ``mmfree sim-board`` does (build, start, print the URL, serve until
  interrupted). ``python -m mmfree.sim.board --bench`` measures simulated cycles per second.

Not to be confused with sim/refboard.py, the plain-Python reference model of the protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mmfree.firmware.isa import ICEBREAKER, HardwareConfig

__all__ = ["CORES", "TOP_NAME", "VERILATOR_MISSING", "SimBoardError", "BuildResult", "SimStats",
           "cache_root", "verilator_available", "make_top", "top_verilog", "build", "listen",
           "SimBoard", "serve", "bench"]

CORES = ("accelerator", "stub")
TOP_NAME = "mmfree_top"         # the generated module; sim/verilator/simboard_top.v wraps it
SIM_TOP = "simboard_top"
SOURCE_DIR = Path(__file__).resolve().parent / "verilator"
EXECUTABLE = "simboard"
VERILATOR_MISSING = ("Verilator is not installed: run `make test` as root (it installs it) or "
                     "`sudo apt-get install verilator`")
# Verilator options that change the executable (part of the cache key). -O3: Verilator's own
# optimizations; -fno-table: case statements as code rather than lookup tables (7% fewer
# instructions per cycle for the accelerator); OPT_FAST: the C++ of the per-cycle code (-O2:
# ~30% faster than the default -Os; x86-64-v3 (AVX2, BMI2) where the CPU has it: 10% fewer
# instructions).
_X86_64_V3 = {"avx2", "bmi1", "bmi2", "fma", "movbe", "f16c", "abm"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def verilator_flags() -> tuple[str, ...]:
    """The Verilator options of the build (they are part of the cache key)."""
    opt_fast = "-O2 -march=x86-64-v3" if _X86_64_V3 <= _cpu_flags() else "-O2"
    return ("-O3", "-fno-table", "--x-assign", "fast", "--x-initial", "fast", "--noassert",
            "-Wno-fatal", "-Wno-lint", "-Wno-style", "-MAKEFLAGS", f"OPT_FAST='{opt_fast}'")  # quoted: Verilator runs make through a shell


KEEP_BUILDS = 8                 # cached executables kept (about 1.5 MB each)
READY_TIMEOUT_S = 30.0          # the executable binds nothing itself; it only has to start


class SimBoardError(RuntimeError):
    """The simulated board could not be built or started; the message says why and what to do."""


def cache_root() -> Path:
    """``$MMFREE_CACHE/simboard``, else ``$XDG_CACHE_HOME/mmfree/simboard``, else
    ``~/.cache/mmfree/simboard``."""
    if os.environ.get("MMFREE_CACHE"):
        return Path(os.environ["MMFREE_CACHE"]) / "simboard"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mmfree" / "simboard"


def verilator_available() -> bool:
    return shutil.which("verilator") is not None


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SimBoardError(f"`{' '.join(argv)}` failed ({exc}); "
                            + (VERILATOR_MISSING if argv[0] == "verilator" else
                               "install a C++ compiler (sudo apt-get install g++)")) from None
    return out.strip().splitlines()[0] if out.strip() else ""


def make_top(hw: HardwareConfig, core: str = "accelerator"):
    """The AcceleratorTop to simulate: with the real core (``"accelerator"``) or the link
    layer's test double (``"stub"``, :class:`mmfree.hdl.link.StubCore`)."""
    from mmfree.hdl.top import AcceleratorTop
    if core not in CORES:
        raise ValueError(f"core must be one of {', '.join(CORES)}, not {core!r}")
    if core == "stub":
        from mmfree.hdl.link import StubCore
        return AcceleratorTop(hw, core=StubCore(hw.weight_bytes, hw.max_vocab))
    try:
        return AcceleratorTop(hw)
    except ModuleNotFoundError as exc:
        if exc.name != "mmfree.hdl.accelerator":
            raise
        raise SimBoardError("this mmfree has no accelerator core (mmfree.hdl.accelerator); simulate "
                            "the link layer's test double instead (mmfree sim-board --core stub)") from None


def top_verilog(hw: HardwareConfig, core: str = "accelerator") -> str:
    """The Verilog of :func:`make_top` as module :data:`TOP_NAME` (no source locations, so
    the text, and the cache key, depend only on the design)."""
    from amaranth.back import verilog
    return verilog.convert(make_top(hw, core), name=TOP_NAME, emit_src=False)


def _sources() -> list[Path]:
    files = sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h", ".v"))
    if not any(p.name == "main.cpp" for p in files):
        raise SimBoardError(f"{SOURCE_DIR / 'main.cpp'} is missing; reinstall mmfree")
    return files


@dataclass(frozen=True)
class BuildResult:
    executable: Path        # the simulated board's program
    key: str                # cache key (sha256 hex)
    built: bool             # compiled now (False: found in the cache)
    verilog_s: float        # seconds to generate the Verilog
    compile_s: float        # seconds Verilator took (0 when cached)
    hw: HardwareConfig
    core: str


def build(hw: HardwareConfig = ICEBREAKER, core: str = "accelerator", *, cache: Path | None = None,
          status=None, jobs: int | None = None) -> BuildResult:
    """Generate the Verilog of the top and compile it with Verilator unless the cache holds
    the executable for the same key already. ``status(text)`` receives progress lines
    (default: none). Concurrent builds of one key wait for each other (file lock)."""
    say = status or (lambda text: None)
    if not verilator_available():
        raise SimBoardError(VERILATOR_MISSING)
    t0 = time.perf_counter()
    say(f"generating the Verilog of the {core} top ({hw.lanes} lanes)")
    text = top_verilog(hw, core)
    verilog_s = time.perf_counter() - t0
    sources = _sources()
    flags = verilator_flags()
    h = hashlib.sha256()
    for part in ([text.encode()] + [f"{p.name}\0".encode() + p.read_bytes() for p in sources]
                 + ["\0".join(flags).encode(), _tool_version(["verilator", "--version"]).encode(),
                    _tool_version([os.environ.get("CXX", "c++"), "--version"]).encode()]):
        h.update(len(part).to_bytes(8, "little") + part)
    key = h.hexdigest()
    root = Path(cache) if cache is not None else cache_root()
    final = root / key[:24]
    exe = final / EXECUTABLE
    if exe.exists():
        say(f"using the cached build {exe}")
        os.utime(final)                                     # most recently used: kept by _prune
        return BuildResult(exe, key, False, verilog_s, 0.0, hw, core)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key[:24]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.exists():                                    # another process built it meanwhile
            return BuildResult(exe, key, False, verilog_s, 0.0, hw, core)
        t1 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root))
        try:
            (work / f"{TOP_NAME}.v").write_text(text)
            argv = ["verilator", "--cc", "--exe", "--build", *flags,
                    "-j", str(jobs or os.cpu_count() or 1), "--top-module", SIM_TOP,
                    "-Mdir", "obj", "-o", EXECUTABLE, f"{TOP_NAME}.v", *map(str, sources)]
            ticker = _Ticker(say, "compiling with Verilator (under a minute)")
            with open(work / "build.log", "w") as log, ticker:
                rc = subprocess.run(argv, cwd=work, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0 or not (work / "obj" / EXECUTABLE).exists():
                failed_log = root / f"{key[:24]}.failed.log"
                shutil.copyfile(work / "build.log", failed_log)
                tail = "".join(failed_log.read_text(errors="replace").splitlines(True)[-25:])
                raise SimBoardError(f"Verilator failed (exit status {rc}); the end of its log "
                                    f"({failed_log}):\n{tail}")
            (work / "obj" / EXECUTABLE).rename(work / EXECUTABLE)
            shutil.rmtree(work / "obj")
            (work / "key").write_text(f"{key}\n{hw}\ncore={core}\n")
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)     # gone already after a good build
    compile_s = time.perf_counter() - t1
    say(f"built in {compile_s:.0f} s: {exe}")
    _prune(root)
    return BuildResult(exe, key, True, verilog_s, compile_s, hw, core)


def _prune(root: Path, keep: int = KEEP_BUILDS):
    """Remove all but the ``keep`` most recently used builds (each design change makes one)."""
    builds = sorted((p for p in root.iterdir() if p.is_dir() and (p / EXECUTABLE).exists()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        (root / f"{old.name}.lock").unlink(missing_ok=True)


class _Ticker:
    """A status line with the elapsed seconds, refreshed every second on a terminal."""

    def __init__(self, say, text: str):
        self.say, self.text = say, text
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.say(self.text)
        if self.say is _stderr_status and sys.stderr.isatty():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(1.0):
            sys.stderr.write(f"\rsim-board: {self.text}: {time.perf_counter() - self.t0:.0f} s ")
            sys.stderr.flush()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
            sys.stderr.write("\n")


def _stderr_status(text: str):
    print(f"sim-board: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- running

_STATS = re.compile(r"simboard: (?P<when>[^:]+): (?P<cycles>\d+) cycles in (?P<seconds>[\d.]+) s of "
                    r"ticking \((?P<cpu_seconds>[\d.]+) s CPU\).*?; (?P<bytes_in>\d+) bytes in, "
                    r"(?P<bytes_out>\d+) bytes out, (?P<framing_errors>\d+) framing errors; board UART: "
                    r"(?P<rx_errors>\d+) rx errors, (?P<rx_overruns>\d+) rx overruns")


@dataclass(frozen=True)
class SimStats:
    """A statistics line of the simulated board: cycles simulated so far, the wall time and the
    CPU time spent ticking them (sleeps excluded), bytes through the socket, UART framing errors
    seen on the board's transmit line and the board receiver's error and overrun counters (all
    three should stay 0)."""
    cycles: int
    seconds: float
    cpu_seconds: float
    bytes_in: int
    bytes_out: int
    framing_errors: int
    rx_errors: int
    rx_overruns: int

    @property
    def cycles_per_second(self) -> float:
        """Simulated cycles per second of wall time while ticking."""
        return self.cycles / self.seconds if self.seconds > 0 else 0.0

    @property
    def cycles_per_cpu_second(self) -> float:
        """Simulated cycles per second of CPU time: the rate on an otherwise idle machine."""
        return self.cycles / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    def format(self) -> str:
        return (f"{self.cycles:,} cycles in {self.seconds:.2f} s: "
                f"{self.cycles_per_second / 1e6:.2f} M cycles/s wall, "
                f"{self.cycles_per_cpu_second / 1e6:.2f} M cycles/s per CPU second")

    @classmethod
    def parse_last(cls, text: str) -> "SimStats | None":
        found = list(_STATS.finditer(text))
        if not found:
            return None
        g = found[-1].groupdict()
        return cls(int(g["cycles"]), float(g["seconds"]), float(g["cpu_seconds"]), int(g["bytes_in"]),
                   int(g["bytes_out"]), int(g["framing_errors"]), int(g["rx_errors"]),
                   int(g["rx_overruns"]))


def listen(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:``port`` (0: any free port) for :class:`SimBoard`;
    SimBoardError with the reason when the port cannot be had."""
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SimBoardError(f"cannot listen on 127.0.0.1:{port}: {reason}; choose another port") from None


class SimBoard:
    """A running simulated board: ``build_result``'s executable serving a listening socket on
    127.0.0.1:``port`` (0: any free port), or on ``listener`` (from :func:`listen`; it is
    handed to the child and closed here). Attributes ``url`` (``socket://127.0.0.1:PORT``),
    ``port``, ``process``, ``hw``. ``stderr``: where the child's statistics lines go (a file
    object or None: a temporary file, read back by :meth:`close`). Use as a context manager.

    One client at a time; the design keeps its state from one client to the next, as a powered
    board does. The child exits when this process dies."""

    def __init__(self, build_result: BuildResult, port: int = 0, *, stderr=None,
                 idle_cycles: int | None = None, listener: socket.socket | None = None):
        from mmfree.hdl.uart import uart_divisor
        self.hw = build_result.hw
        divisor = uart_divisor(self.hw.clock_hz, self.hw.baud)
        if listener is None:
            listener = listen(port)
        self.port = listener.getsockname()[1]
        self.url = f"socket://127.0.0.1:{self.port}"
        self._log = None
        if stderr is None:
            self._log = tempfile.TemporaryFile(mode="w+", prefix="simboard-")
            stderr = self._log
        argv = [str(build_result.executable), "--fd", str(listener.fileno()), "--divisor", str(divisor),
                "--clock-hz", str(self.hw.clock_hz)]
        if idle_cycles is not None:
            argv += ["--idle-cycles", str(idle_cycles)]
        try:
            self.process = subprocess.Popen(argv, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=stderr)
        except OSError as exc:
            raise SimBoardError(f"cannot start {build_result.executable}: {exc}") from None
        finally:
            listener.close()        # the child holds its own copy
        self._stats: SimStats | None = None
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            r, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if r:
                chunk = os.read(self.process.stdout.fileno(), 64)
                if not chunk:
                    break
                line += chunk
        if line.strip() != b"ready":
            self.process.kill()
            self.process.wait()
            detail = ""
            if self._log is not None:
                self._log.seek(0)
                detail = ": " + self._log.read().strip()
            raise SimBoardError(f"the simulated board did not start (exit status "
                                f"{self.process.returncode}){detail}")

    def stats(self) -> SimStats | None:
        """The last statistics line so far (only when ``stderr`` was left to this class)."""
        if self._log is None:
            return self._stats
        self._log.flush()
        self._log.seek(0)
        return SimStats.parse_last(self._log.read())

    def close(self, timeout: float = 10.0) -> SimStats | None:
        """Stop the child (SIGTERM; SIGKILL after ``timeout``) and return its final statistics
        (None when its stderr went elsewhere)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        if self._log is not None:
            self._stats = self.stats()
            self._log.close()
            self._log = None
        return self._stats

    def __enter__(self) -> "SimBoard":
        return self

    def __exit__(self, *exc):
        self.close()


def bench(build_result: BuildResult, cycles: int = 20_000_000) -> SimStats:
    """Run ``cycles`` cycles with an idle line (no socket) and return the statistics."""
    from mmfree.hdl.uart import uart_divisor
    hw = build_result.hw
    out = subprocess.run([str(build_result.executable), "--bench", str(cycles), "--divisor",
                          str(uart_divisor(hw.clock_hz, hw.baud)), "--clock-hz", str(hw.clock_hz)],
                         capture_output=True, text=True)
    stats = SimStats.parse_last(out.stderr)
    if out.returncode != 0 or stats is None:
        raise SimBoardError(f"the simulated board's bench failed (exit status {out.returncode}): "
                            f"{out.stderr.strip()}")
    return stats


def serve(hw: HardwareConfig = ICEBREAKER, *, port: int = 5555, core: str = "accelerator",
          out=None) -> int:
    """``mmfree sim-board``: build when needed (status lines on stderr), start the simulated
    board, print its URL as the first line on ``out`` (stdout), serve until interrupted
    (Ctrl-C or SIGTERM: exit status 0) or until the child fails (1)."""
    out = out or sys.stdout
    listener = listen(port)         # a port in use fails at once, not after the build
    try:
        result = build(hw, core, status=_stderr_status)
    except BaseException:
        listener.close()
        raise
    # SIGTERM → KeyboardInterrupt, so `kill` ends the server as cleanly as Ctrl-C
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    board = None
    try:
        board = SimBoard(result, stderr=sys.stderr, listener=listener)
        print(board.url, file=out, flush=True)
        _stderr_status(f"serving the simulated {core} board ({hw.lanes} lanes, "
                       f"{hw.clock_hz / 1e6:g} MHz, {hw.baud} baud) on {board.url}; Ctrl-C stops it")
        rc = board.process.wait()
        if rc != 0:
            raise SimBoardError(f"the simulated board stopped with exit status {rc}")
    except KeyboardInterrupt:
        pass
    finally:
        if board is not None:
            board.close()
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mmfree.sim.board",
        description="Build the simulated board (Verilator) and measure its speed, or serve it "
                    "(as `mmfree sim-board`).")
    p.add_argument("--lanes", type=int, default=ICEBREAKER.lanes, choices=(8, 16, 32))
    p.add_argument("--core", choices=CORES, default="accelerator",
                   help="the real accelerator core or the link layer's test double")
    p.add_argument("--port", type=int, default=5555, help="TCP port to serve on (default 5555)")
    p.add_argument("--bench", type=int, metavar="CYCLES", nargs="?", const=20_000_000,
                   help="do not serve: print simulated cycles/s over CYCLES cycles (default 2e7)")
    args = p.parse_args(argv)
    hw = dataclasses.replace(ICEBREAKER, lanes=args.lanes)
    try:
        if args.bench is None:
            return serve(hw, port=args.port, core=args.core)
        result = build(hw, args.core, status=_stderr_status)
        stats = bench(result, args.bench)
    except SimBoardError as exc:
        print(f"sim-board: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.core} top, {hw.lanes} lanes: Verilog {result.verilog_s:.1f} s, compile "
          f"{f'{result.compile_s:.0f} s' if result.built else 'cached'}; {stats.format()} "
          f"({stats.cycles_per_second / hw.clock_hz:.3f}x real time at {hw.clock_hz / 1e6:g} MHz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
