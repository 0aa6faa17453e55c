"""The iCEBreaker board (iCE40UP5K-SG48): PLL, power-on reset and UART pins around the
board-independent accelerator top.

    from mmfree.hdl.boards.icebreaker import BOARD, ICEBreakerTop, pll_params
    pll_params(12e6, 24e6)   # PLLParams(divr=0, divf=63, divq=5, filter_range=1, ...)

Clock: the 12 MHz crystal oscillator drives pin 35, the PLL's own input pad on the UP5K, so the
PLL is an ``SB_PLL40_PAD`` (it takes the pad directly, so the pad's own global buffer stays
free). nextpnr derives the output clock's timing constraint from the pin's 12 MHz. Simple feedback: ``f_out = f_in · (DIVF + 1) /
((DIVR + 1) · 2^DIVQ)``, with the sysCLOCK limits of the iCE40 datasheet (phase detector
10..133 MHz, VCO 533..1066 MHz, output 16..275 MHz). From 12 MHz every reachable frequency is a
whole number of Hz (12 MHz = 2^8 · 46875 and DIVQ <= 6).

Reset: the ``sync`` domain is held in reset until the PLL has locked and then for
:data:`POR_US` microseconds more (the iCE40's block RAMs read as zero for ~3 µs after
configuration; Amaranth's default power-on reset waits 15 µs for the same reason). Losing lock
resets the design again.

Pins: ``platform.request("uart", 0, dir="-")`` (FT2232H channel B: rx pin 6, tx pin 9) through
``io.Buffer``s to the design's ``uart_rx``/``uart_tx``. ``uart_rx`` is not synchronized here:
the UART receiver has its own 2-flop synchronizer.
"""

import dataclasses
from dataclasses import dataclass
from fractions import Fraction

from amaranth import (C, ClockDomain, ClockSignal, DomainRenamer, Elaboratable, Instance, Module,
                      ResetSignal, Signal)
from amaranth.lib import io, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from mmfree.firmware.isa import ICEBREAKER, HardwareConfig
from mmfree.hdl.boards import BoardSpec

__all__ = ["CRYSTAL_HZ", "POR_US", "PLL_LIMITS_HZ", "PLLParams", "pll_params", "snap_clock",
           "PowerOnReset", "ICEBreakerTop", "BOARD"]

CRYSTAL_HZ = 12_000_000
POR_US = 20
PLL_TOLERANCE = 0.005           # the largest relative clock error pll_params accepts by default

# iCE40 sysCLOCK PLL, simple feedback (iCE40 LP/HX/UltraPlus datasheets; icestorm's icepll)
PLL_LIMITS_HZ = {
    "f_in": (10_000_000, 133_000_000),
    "f_pfd": (10_000_000, 133_000_000),
    "f_vco": (533_000_000, 1_066_000_000),
    "f_out": (16_000_000, 275_000_000),
}
_DIVR_MAX, _DIVF_MAX, _DIVQ_RANGE = 15, 127, range(1, 7)
# loop filter setting by phase-detector frequency (icepll): FILTER_RANGE = 1 below 17 MHz, ...
_FILTER_STEPS_HZ = (17_000_000, 26_000_000, 44_000_000, 66_000_000, 101_000_000)


@dataclass(frozen=True)
class PLLParams:
    """Settings of an iCE40 PLL in simple-feedback mode and the frequencies they give (Hz)."""
    divr: int
    divf: int
    divq: int
    filter_range: int
    f_in_hz: int
    f_pfd_hz: Fraction
    f_vco_hz: Fraction
    f_out_hz: Fraction

    def describe(self) -> str:
        return (f"{float(self.f_in_hz) / 1e6:g} MHz → {float(self.f_out_hz) / 1e6:.6g} MHz "
                f"(DIVR={self.divr}, DIVF={self.divf}, DIVQ={self.divq}, "
                f"FILTER_RANGE={self.filter_range}; VCO {float(self.f_vco_hz) / 1e6:.0f} MHz)")


def pll_params(f_in_hz: float, f_out_hz: float, *, tolerance: float = PLL_TOLERANCE) -> PLLParams:
    """The PLL settings whose output is closest to ``f_out_hz`` from a reference of ``f_in_hz``.

    The search is icestorm's ``icepll`` (same order, same tie-breaking: the first closest one),
    restricted to outputs within the datasheet's 16..275 MHz. Raises ValueError when the input
    is outside 10..133 MHz, or when the closest output is off by more than ``tolerance``
    (relative; 0.5 % by default), naming the nearest frequencies it can make.
    """
    f_in = Fraction(f_in_hz).limit_denominator(1000)
    want = Fraction(f_out_hz).limit_denominator(1000)
    lo, hi = PLL_LIMITS_HZ["f_in"]
    if not lo <= f_in <= hi:
        raise ValueError(f"the iCE40 PLL needs a reference clock of {lo / 1e6:g}..{hi / 1e6:g} MHz, "
                         f"not {float(f_in) / 1e6:g} MHz")
    if not want > 0:
        raise ValueError(f"the requested PLL output must be a positive frequency, not {f_out_hz!r}")
    best = None
    for setting in _settings(f_in):                 # icepll's order: the first closest one wins
        if best is None or abs(setting[3] - want) < abs(best[3] - want):
            best = setting
    lo, hi = PLL_LIMITS_HZ["f_out"]
    if best is None:        # cannot happen within the input range; kept for a clear message
        raise ValueError(f"the iCE40 PLL has no setting for a {float(f_in) / 1e6:g} MHz reference")
    divr, divf, divq, f_out, f_pfd, f_vco = best
    error = abs(f_out - want) / want
    if error > tolerance:
        if not lo <= want <= hi:
            raise ValueError(f"the iCE40 PLL makes {lo / 1e6:g}..{hi / 1e6:g} MHz, not "
                             f"{float(want) / 1e6:g} MHz; choose a clock in that range")
        below = [f for f in _outputs(f_in) if f <= want]
        above = [f for f in _outputs(f_in) if f >= want]
        near = [f"{float(f) / 1e6:.6g} MHz" for f in [max(below, default=None),
                                                        min(above, default=None)] if f]
        raise ValueError(f"the iCE40 PLL cannot make {float(want) / 1e6:g} MHz from "
                         f"{float(f_in) / 1e6:g} MHz within {tolerance:.1%}; the closest it makes "
                         f"{'are' if len(near) > 1 else 'is'} {' and '.join(near)}")
    filter_range = 1 + sum(f_pfd >= step for step in _FILTER_STEPS_HZ)
    return PLLParams(divr=divr, divf=divf, divq=divq, filter_range=filter_range,
                     f_in_hz=f_in, f_pfd_hz=f_pfd, f_vco_hz=f_vco, f_out_hz=f_out)


def _settings(f_in: Fraction):
    """Every in-range PLL setting from ``f_in``, in icepll's search order:
    (divr, divf, divq, f_out, f_pfd, f_vco)."""
    for divr in range(_DIVR_MAX + 1):
        f_pfd = f_in / (divr + 1)
        if not PLL_LIMITS_HZ["f_pfd"][0] <= f_pfd <= PLL_LIMITS_HZ["f_pfd"][1]:
            continue
        for divf in range(_DIVF_MAX + 1):
            f_vco = f_pfd * (divf + 1)
            if not PLL_LIMITS_HZ["f_vco"][0] <= f_vco <= PLL_LIMITS_HZ["f_vco"][1]:
                continue
            for divq in _DIVQ_RANGE:
                f_out = f_vco / 2 ** divq
                if PLL_LIMITS_HZ["f_out"][0] <= f_out <= PLL_LIMITS_HZ["f_out"][1]:
                    yield divr, divf, divq, f_out, f_pfd, f_vco


def _outputs(f_in: Fraction) -> set:
    """Every in-range output frequency of the PLL from ``f_in``."""
    return {setting[3] for setting in _settings(f_in)}


def snap_clock(hw: HardwareConfig) -> HardwareConfig:
    """``hw`` with ``clock_hz`` set to what the iCEBreaker's PLL makes for it (ValueError if
    nothing within 0.5 %), so that the UART divisors and INFO use the real clock."""
    f_out = pll_params(CRYSTAL_HZ, hw.clock_hz).f_out_hz
    assert f_out.denominator == 1, "from 12 MHz every PLL output is a whole number of Hz"
    return dataclasses.replace(hw, clock_hz=int(f_out))


class PowerOnReset(wiring.Component):
    """Reset until a PLL has locked and ``cycles`` clock cycles more; again whenever the lock
    is lost. Runs in ``sync`` (rename it to a reset-less domain: it has no reset of its own and
    needs none, its registers start at zero with the bitstream).

    Ports: ``lock`` In(1) (asynchronous: the PLL's LOCK; two flip-flops synchronize it),
    ``rst`` Out(1), high from configuration until ``cycles + 3`` cycles after ``lock`` rose
    (synchronizer, count, register), and from 3 cycles after ``lock`` fell.
    """

    lock: In(1)
    rst: Out(1)

    def __init__(self, cycles: int):
        if not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"PowerOnReset needs a positive number of cycles, not {cycles!r}")
        self.cycles = cycles
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        locked = Signal()
        m.submodules.lock_sync = FFSynchronizer(self.lock, locked)
        timer = Signal(range(self.cycles + 1))
        ready = Signal()
        with m.If(~locked):
            m.d.sync += [timer.eq(0), ready.eq(0)]
        with m.Elif(timer == self.cycles):
            m.d.sync += ready.eq(1)
        with m.Else():
            m.d.sync += timer.eq(timer + 1)
        m.d.comb += self.rst.eq(~ready)
        return m


class ICEBreakerTop(Elaboratable):
    """The iCEBreaker wrapper of a design with ``uart_rx`` (In 1) and ``uart_tx`` (Out 1) ports.

    Parameters
    ----------
    hw : HardwareConfig
        ``hw.clock_hz`` is the PLL's output (within 0.5 %; :func:`snap_clock` makes it exact).
    design : Elaboratable, optional
        The design clocked by the PLL in the ``sync`` domain; default
        ``AcceleratorTop(hw, spram=True)`` (mmfree.hdl.top).

    Attributes: ``hw``, ``design``, ``pll`` (:class:`PLLParams`). Only elaborates for an
    ICEBreakerPlatform (it requests the ``clk12`` and ``uart`` resources).
    """

    def __init__(self, hw: HardwareConfig, design: Elaboratable | None = None):
        if not isinstance(hw, HardwareConfig):
            raise ValueError(f"ICEBreakerTop needs a HardwareConfig, got {type(hw).__name__}")
        self.hw = hw
        self.pll = pll_params(CRYSTAL_HZ, hw.clock_hz)
        if design is None:
            from mmfree.hdl.top import AcceleratorTop
            design = AcceleratorTop(hw, spram=True)
        for port in ("uart_rx", "uart_tx"):
            if not hasattr(design, port):
                raise ValueError(f"the design for the iCEBreaker must have a {port} port "
                                 f"(like AcceleratorTop), {type(design).__name__} has none")
        self.design = design

    def elaborate(self, platform):
        if platform is None:
            raise ValueError("ICEBreakerTop elaborates only for an ICEBreakerPlatform (it uses "
                             "the board's clock and UART pins); simulate the design itself instead")
        m = Module()
        pll = self.pll

        clk12 = platform.request("clk12", 0, dir="-")
        pll_clk = Signal()
        lock = Signal()
        m.submodules.pll = Instance(
            "SB_PLL40_PAD",
            p_FEEDBACK_PATH="SIMPLE", p_PLLOUT_SELECT="GENCLK",
            p_DIVR=C(pll.divr, 4), p_DIVF=C(pll.divf, 7), p_DIVQ=C(pll.divq, 3),
            p_FILTER_RANGE=C(pll.filter_range, 3),
            i_PACKAGEPIN=clk12.io, i_RESETB=C(1, 1), i_BYPASS=C(0, 1),
            o_PLLOUTGLOBAL=pll_clk, o_LOCK=lock)
        # No clock constraint of our own: nextpnr derives the output's from the 12 MHz pin's
        # and the PLL's settings (so the build checks those settings too).

        # the power-on reset runs in a reset-less domain on the same clock
        m.domains.por = ClockDomain("por", reset_less=True, local=True)
        m.domains.sync = ClockDomain("sync")
        m.d.comb += [ClockSignal("por").eq(pll_clk), ClockSignal("sync").eq(pll_clk)]
        m.submodules.por = por = DomainRenamer("por")(
            PowerOnReset(POR_US * int(pll.f_out_hz) // 1_000_000))
        m.d.comb += [por.lock.eq(lock), ResetSignal("sync").eq(por.rst)]

        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx_buffer = rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx_buffer = tx = io.Buffer("o", uart.tx)
        m.submodules.design = self.design
        m.d.comb += [self.design.uart_rx.eq(rx.i), tx.o.eq(self.design.uart_tx)]
        return m


def _platform():
    from amaranth_boards.icebreaker import ICEBreakerPlatform
    return ICEBreakerPlatform()


BOARD = BoardSpec(
    name="icebreaker",
    description="1BitSquared iCEBreaker: iCE40UP5K-SG48, 12 MHz crystal, FT2232H USB-UART",
    hardware=ICEBREAKER,
    platform=_platform,
    top=ICEBreakerTop,
    snap_clock=snap_clock,
    device="up5k",
    package="sg48",
    resources={"ICESTORM_LC": 5280, "ICESTORM_RAM": 30, "ICESTORM_SPRAM": 4, "ICESTORM_DSP": 8},
    bin_bytes=104_090,
    programmer="iceprog",
)
