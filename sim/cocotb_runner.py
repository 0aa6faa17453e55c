"""Run cocotb testbenches (Icarus Verilog) on Amaranth components, from pytest.

The component is converted to Verilog with Amaranth's builtin Yosys, built with
``cocotb_tools.runner`` and run; parameters reach the testbench as JSON in the environment
variable ``MMFREE_TB_PARAMS`` (read them with :func:`tb_params`). A run that executes no test,
or any failing test, fails the calling pytest test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["icarus_available", "verilog_for", "run_cocotb", "tb_params", "ICARUS_MISSING"]

ICARUS_MISSING = ("Icarus Verilog is not installed: run `make test` as root (it installs it) or "
                  "`sudo apt-get install iverilog`")


def icarus_available() -> bool:
    return shutil.which("iverilog") is not None and shutil.which("vvp") is not None


def verilog_for(component, name: str) -> str:
    from amaranth.back import verilog
    return verilog.convert(component, name=name, emit_src=False)


def run_cocotb(component, name: str, test_module: str, build_dir: str | Path, *,
               params: dict | None = None, seed: int | None = None, testcase: str | None = None) -> None:
    """Build ``component`` as Verilog module ``name`` and run the cocotb tests in
    ``test_module`` (a dotted module name importable from this process's sys.path)."""
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    if not icarus_available():
        raise RuntimeError(ICARUS_MISSING)
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / f"{name}.v"
    source.write_text(verilog_for(component, name))
    runner = get_runner("icarus")
    # -g2005 after cocotb's -g2012: under 2012 semantics Icarus never evaluates a yosys
    # `always @*` block whose inputs keep their initial values, leaving its outputs X.
    runner.build(sources=[source], hdl_toplevel=name, build_dir=build_dir, always=True,
                 timescale=("1ns", "1ps"), build_args=["-g2005"])
    env = {"MMFREE_TB_PARAMS": json.dumps(params or {})}
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(Path.cwd())) if p)
    env["PYTHONPATH"] = pythonpath
    results = build_dir / "results.xml"
    xml = runner.test(hdl_toplevel=name, test_module=test_module, build_dir=build_dir,
                      test_dir=build_dir, seed=seed, testcase=testcase, extra_env=env,
                      results_xml=str(results))
    total, failed = get_results(Path(xml))
    assert total > 0, f"cocotb ran no test from {test_module}"
    assert failed == 0, f"{failed} of {total} cocotb tests in {test_module} failed (log above)"


def tb_params() -> dict:
    """Inside a cocotb test: the parameters given to :func:`run_cocotb`."""
    return json.loads(os.environ.get("MMFREE_TB_PARAMS", "{}"))
