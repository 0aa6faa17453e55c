"""Small building blocks shared by the datapath units: a sequential divider and a bit-length
(leading-one position) encoder."""

from __future__ import annotations

from amaranth import Module, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["bit_length", "SeqDivider"]


def bit_length(m: Module, value, name: str = "bitlen") -> Signal:
    """Combinational ``value.bit_length()`` of an unsigned value (0 for 0): a priority encoder."""
    width = len(value)
    out = Signal(range(width + 1), name=name)
    for i in range(width):          # later assignments win: the highest set bit decides
        with m.If(value[i]):
            m.d.comb += out.eq(i + 1)
    return out


class SeqDivider(wiring.Component):
    """Unsigned restoring division, one quotient bit per cycle.

    Parameters: ``dividend_width``, ``divisor_width``.

    ``i_stream`` payload {dividend, divisor}; ``o_stream`` payload {quotient
    (dividend_width bits), remainder (divisor_width bits)} with ``quotient = dividend //
    divisor`` and ``remainder = dividend % divisor`` exactly. A zero divisor gives an all-ones
    quotient (callers never divide by zero: the arithmetic contract rules it out).

    Latency: ``dividend_width + 1`` cycles from the accepted input to ``o_stream.valid``; one
    division at a time (``i_stream.ready`` is high only while idle). The result is held until
    taken; ``o_stream.ready`` may drop at any time.
    """

    def __init__(self, dividend_width: int, divisor_width: int):
        if dividend_width < 1 or divisor_width < 1:
            raise ValueError("SeqDivider widths must be at least 1 bit")
        self.dividend_width = dividend_width
        self.divisor_width = divisor_width
        super().__init__({
            "i_stream": In(stream.Signature(data.StructLayout({
                "dividend": unsigned(dividend_width), "divisor": unsigned(divisor_width)}))),
            "o_stream": Out(stream.Signature(data.StructLayout({
                "quotient": unsigned(dividend_width), "remainder": unsigned(divisor_width)}))),
        })

    def elaborate(self, platform):
        m = Module()
        nw, dw = self.dividend_width, self.divisor_width
        quotient = Signal(nw)           # shifts in quotient bits while shifting out dividend bits
        rem = Signal(dw + 1)
        divisor = Signal(dw)
        count = Signal(range(nw + 1))
        busy = Signal()

        trial = Signal(dw + 2)
        m.d.comb += trial.eq(((rem << 1) | quotient[nw - 1]) - divisor)

        m.d.comb += [
            self.i_stream.ready.eq(~busy & ~self.o_stream.valid),
            self.o_stream.p.quotient.eq(quotient),
            self.o_stream.p.remainder.eq(rem[:dw]),
        ]
        with m.If(self.o_stream.valid & self.o_stream.ready):
            m.d.sync += self.o_stream.valid.eq(0)
        with m.If(self.i_stream.valid & self.i_stream.ready):
            m.d.sync += [quotient.eq(self.i_stream.p.dividend), divisor.eq(self.i_stream.p.divisor),
                         rem.eq(0), count.eq(nw), busy.eq(1)]
        with m.If(busy):
            # trial's top bit is the borrow: clear means (rem·2 + next bit) >= divisor
            with m.If(~trial[dw + 1]):
                m.d.sync += [rem.eq(trial[:dw + 1]), quotient.eq((quotient << 1) | 1)]
            with m.Else():
                m.d.sync += [rem.eq((rem << 1) | quotient[nw - 1]), quotient.eq(quotient << 1)]
            m.d.sync += count.eq(count - 1)
            with m.If(count == 1):
                m.d.sync += [busy.eq(0), self.o_stream.valid.eq(1)]
        return m
