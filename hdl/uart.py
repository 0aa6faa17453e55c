"""UART 8N1 receiver and transmitter with byte streams (the board's side of the host link).

The bit period is a whole number of clock cycles, ``divisor = round(clk_hz / baud)``
(:func:`uart_divisor` checks it); the receiver resynchronizes on every start bit, so the rate
error only has to hold over one 10-bit character.
"""


from amaranth import Cat, C, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["uart_divisor", "UARTRx", "UARTTx", "MAX_RATE_ERROR", "MIN_DIVISOR"]

MAX_RATE_ERROR = 0.02   # the sampling point drifts 9.5 bit times by this much at the stop bit
MIN_DIVISOR = 4         # below 4 cycles per bit mid-bit sampling has no margin left


def uart_divisor(clk_hz: int, baud: int) -> int:
    """Clock cycles per bit, ``round(clk_hz / baud)``; ValueError when the divisor is below
    :data:`MIN_DIVISOR` or the resulting rate is more than 2 % off ``baud``."""
    if not isinstance(clk_hz, int) or not isinstance(baud, int) or clk_hz <= 0 or baud <= 0:
        raise ValueError(f"UART clock and baud rate must be positive integers (Hz), "
                         f"got clk_hz={clk_hz!r}, baud={baud!r}")
    divisor = round(clk_hz / baud)
    if divisor < MIN_DIVISOR:
        raise ValueError(f"UART at {baud} baud from a {clk_hz} Hz clock gives {clk_hz / baud:.2f} "
                         f"cycles per bit, fewer than {MIN_DIVISOR}: raise the clock or lower "
                         f"the baud rate")
    error = abs(clk_hz / divisor - baud) / baud
    if error > MAX_RATE_ERROR:
        raise ValueError(f"UART at {baud} baud from a {clk_hz} Hz clock: a divisor of {divisor} "
                         f"cycles per bit gives {clk_hz / divisor:.0f} baud, {error:.1%} off "
                         f"(at most {MAX_RATE_ERROR:.0%} works): choose a clock that is closer "
                         f"to a multiple of the baud rate")
    return divisor


class UARTRx(wiring.Component):
    """UART 8N1 receiver.

    Parameters: ``clk_hz``, ``baud`` (see :func:`uart_divisor`; attribute ``divisor``).

    Ports
    -----
    rx : In(1, init=1)
        The serial line (idle high). It goes through a 2-flop synchronizer first.
    o_stream : Out(stream.Signature(8))
        One received byte per transfer. A byte is held (``valid``) until taken.
    rx_errors : Out(16)
        Framing errors (stop bit read as 0), wrapping. The byte is dropped; the receiver then
        waits for the line to return high (a break counts once) before looking for a start bit.
    rx_overruns : Out(16)
        Bytes dropped because the previous byte was still not taken when the new byte's stop
        bit was sampled, wrapping. The byte already waiting in ``o_stream`` is kept; the new
        one is lost. (The link layer takes bytes within a few cycles except while it executes
        a command and sends its reply; the host sends a request only after the previous
        reply, so overruns mean a misbehaving host.)

    Timing: a falling edge on the synchronized line starts a character; the start bit is
    re-checked half a bit later (a shorter low pulse is a glitch and is ignored), then each
    data bit (LSB first) and the stop bit are sampled one ``divisor`` apart, i.e. in the middle
    of each bit. After the stop bit's sample the receiver looks for the next falling edge at
    once, so it resynchronizes on every start bit. ``o_stream.valid`` rises 3 cycles after the
    stop-bit sampling point on the pin (2 synchronizer flops + the output register).
    """

    rx: In(1, init=1)
    rx_errors: Out(16)
    rx_overruns: Out(16)
    o_stream: Out(stream.Signature(8))

    def __init__(self, clk_hz: int, baud: int):
        self.divisor = uart_divisor(clk_hz, baud)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        sync1 = Signal(init=1)
        line = Signal(init=1)           # the synchronized line
        m.d.sync += [sync1.eq(self.rx), line.eq(sync1)]

        timer = Signal(range(d))
        # the data bits shift in at the top behind a marker bit (loaded at the start bit), so
        # the last data bit is due when the marker has reached bit 0: no bit counter
        shreg = Signal(8)
        expired = Signal()
        m.d.comb += expired.eq(timer == 0)
        with m.If(~expired):
            m.d.sync += timer.eq(timer - 1)

        o = self.o_stream
        with m.If(o.valid & o.ready):
            m.d.sync += o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    m.d.sync += timer.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(expired):
                    with m.If(~line):
                        m.d.sync += [timer.eq(d - 1), shreg.eq(0x80)]
                        m.next = "DATA"
                    with m.Else():
                        m.next = "IDLE"         # a glitch, not a start bit
            with m.State("DATA"):
                with m.If(expired):
                    m.d.sync += [shreg.eq(Cat(shreg[1:], line)), timer.eq(d - 1)]
                    with m.If(shreg[0]):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(expired):
                    with m.If(line):
                        with m.If(o.valid & ~o.ready):
                            m.d.sync += self.rx_overruns.eq(self.rx_overruns + 1)
                        with m.Else():
                            m.d.sync += [o.payload.eq(shreg), o.valid.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += self.rx_errors.eq(self.rx_errors + 1)
                        m.next = "BREAK"
            with m.State("BREAK"):
                with m.If(line):
                    m.next = "IDLE"
        return m


class UARTTx(wiring.Component):
    """UART 8N1 transmitter.

    Parameters: ``clk_hz``, ``baud`` (see :func:`uart_divisor`; attribute ``divisor``).

    Ports
    -----
    i_stream : In(stream.Signature(8))
        Bytes to send. ``ready`` is high while the transmitter is idle and in the last cycle of
        a stop bit, so back-to-back bytes go out with no gap: one byte per ``10 · divisor``
        cycles.
    tx : Out(1, init=1)
        The serial line, straight from a flip-flop (idle high). The start bit begins the cycle
        after the byte's transfer; each bit lasts ``divisor`` cycles.
    """

    i_stream: In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, clk_hz: int, baud: int):
        self.divisor = uart_divisor(clk_hz, baud)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        shreg = Signal(10, init=(1 << 10) - 1)     # stop · data · start, sent LSB first
        bits = Signal(range(11))                   # bits still on the line, the current one included
        timer = Signal(range(d))
        m.d.comb += self.tx.eq(shreg[0])

        last_cycle = Signal()
        m.d.comb += last_cycle.eq((bits == 1) & (timer == 0))
        i = self.i_stream
        m.d.comb += i.ready.eq((bits == 0) | last_cycle)

        with m.If(i.valid & i.ready):
            m.d.sync += [shreg.eq(Cat(C(0, 1), i.payload, C(1, 1))), bits.eq(10), timer.eq(d - 1)]
        with m.Elif(bits != 0):
            with m.If(timer == 0):
                m.d.sync += [shreg.eq(Cat(shreg[1:], C(1, 1))), bits.eq(bits - 1), timer.eq(d - 1)]
            with m.Else():
                m.d.sync += timer.eq(timer - 1)
        return m
