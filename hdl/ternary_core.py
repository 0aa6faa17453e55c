"""The ternary-accumulate core: ``arith.ternary_accumulate(T, A)`` for ``lanes`` output rows at
a time, one input column (``lanes`` trits) per cycle."""

from __future__ import annotations

from amaranth import Module, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.models.arith import ACT_MAX

__all__ = ["TernaryBeat", "TernaryCore", "acc_width_for"]

ACT_BITS = 8            # activations are int8 (docs/arithmetic.md: A in [-ACT_MAX, ACT_MAX])
TRIT_PLUS = 0b01        # 2-bit trit codes of models/boardfile.py
TRIT_MINUS = 0b11


def acc_width_for(max_row: int) -> int:
    """Bits of the smallest signed range that holds ``±ACT_MAX · max_row``."""
    return (ACT_MAX * max_row).bit_length() + 1


class TernaryBeat(data.StructLayout):
    """One input column of a row group: ``trits`` (2 bits per lane, lane k in bits 2k+1..2k),
    ``act`` (the column's int8 activation), ``first``/``last`` (group boundaries)."""

    def __init__(self, lanes: int):
        super().__init__({"trits": unsigned(2 * lanes), "act": signed(ACT_BITS),
                          "first": 1, "last": 1})


class TernaryCore(wiring.Component):
    """N-lane ternary accumulator: ``acc[k] = sum_j T[k, j] · A[j]`` for a group of N rows.

    Parameters
    ----------
    lanes : int
        N, output rows per group, a multiple of 4 in 8..64 (one byte of the board file holds 4
        trits; 32 lanes use the 64 bits per cycle that four iCE40 SPRAMs give).
    max_row : int
        The longest row (number of input columns of a group) the core must accumulate. It only
        sizes the accumulators: the core does not count columns, so a longer group may overflow.
    acc_width : int, optional
        Accumulator width; by default (and at least) the smallest signed width holding
        ``±127 · max_row`` (``bitlen(127 · max_row) + 1``: 17 for 512, 20 for 4096), so no sum
        can overflow. Exposed as the attribute ``acc_width``.

    Ports
    -----
    i_stream : In(stream.Signature(TernaryBeat(N)))
        One column j of the group per transfer: ``trits`` is the board file's word for column j
        (``models.boardfile.pack_trits``: lane k in bits 2k+1..2k, codes 00 = 0, 01 = +1,
        11 = -1; the invalid code 10 counts as 0), ``act`` = A_j in [-127, 127] (-128 is outside
        the contract: the quantizer never makes it and the overflow-free width assumes |A| <= 127),
        ``first`` on the group's first column (the accumulators start from 0), ``last`` on its
        final column (the N sums are emitted). ``first`` and ``last`` may be set on the same beat.
        After a ``last`` the accumulators are already 0, so a group that omits ``first`` still
        starts from 0; a ``first`` arriving before the previous group's ``last`` abandons that
        group (it produces no output).
    o_stream : Out(stream.Signature(data.ArrayLayout(signed(acc_width), N)))
        The N sums of a group, element k = row k of the group.
        With ``serial=True`` instead ``Out(stream.Signature(signed(acc_width)))``: the group's
        sums one per transfer, row 0 first (the output register shifts; no N:1 selector), and
        ``flush`` : In(1), a strobe that drops the rest of the group (for a partial last group);
        the output is free for the next group after the N-th transfer or the flush.

    Pipeline and latency
    --------------------
    Stage 1 registers each lane's addend (+A, -A or 0, decoded from its trit); stage 2 adds it
    into the lane's accumulator. On a ``last`` beat stage 2 writes the sums into the output
    register instead, and the accumulators restart from 0 in the same cycle, so the next group
    accumulates while the previous group's sums wait to be taken (double buffering).
    Latency: ``o_stream.valid`` rises 2 cycles after the cycle in which the last beat transfers
    (attribute ``latency``). With input always valid and output always ready, G groups of n >= 2
    columns take G·n cycles of input with no bubble: the first input transfer is in cycle 0 and
    the last group's sums transfer in cycle G·n + 1. Groups of a single column run at one per
    2 cycles (the ready rule below).

    Back-pressure
    -------------
    ``i_stream.ready`` drops only while stage 1 holds a ``last`` beat and the output register is
    still full, i.e. the core holds two complete groups (one waiting in the output register,
    the next one with its last beat in stage 1). ``i_stream.ready`` is a function of this core's registers only:
    there is no combinational path from ``o_stream.ready`` (which may drop at any time).
    ``o_stream.valid`` and its payload come straight from registers.

    Resources (iCE40UP5K, ``mmfree.hdl.synth``): about ``8 + 3 · acc_width`` logic cells per
    lane. 8 cells decode the addend (LUT + FF each); each accumulator bit takes a carry cell for
    the adder plus two flip-flop cells (accumulator and output register): the sum feeds both,
    and a logic cell outputs either its LUT or its FF, so neither packs with the adder.
    Measured: lanes 32, max_row 512: 822 LUT4, 1347 FF, 1913 cells, 56.7 MHz; lanes 32,
    max_row 4096: 2201 cells, 53.7 MHz; lanes 8, max_row 512: 497 cells, 66.7 MHz. No DSP, no
    RAM; the critical path is the accumulator's carry chain or the enable fan-out.
    """

    latency = 2     # cycles from the last beat's transfer to o_stream.valid

    def __init__(self, lanes: int, max_row: int, acc_width: int | None = None, *,
                 serial: bool = False):
        if not isinstance(lanes, int) or not 8 <= lanes <= 64 or lanes % 4:
            raise ValueError(f"lanes must be a multiple of 4 from 8 to 64 (4 trits fill a byte of "
                             f"the board file), not {lanes!r}")
        if not isinstance(max_row, int) or max_row < 1:
            raise ValueError(f"max_row must be the longest row in input columns, a positive "
                             f"integer, not {max_row!r}")
        needed = acc_width_for(max_row)
        if acc_width is None:
            acc_width = needed
        elif not isinstance(acc_width, int) or acc_width < needed:
            raise ValueError(f"acc_width {acc_width} cannot hold {ACT_MAX} x {max_row} = "
                             f"{ACT_MAX * max_row}; use at least {needed}")
        self.lanes = lanes
        self.max_row = max_row
        self.acc_width = acc_width
        self.serial = bool(serial)
        members = {"i_stream": In(stream.Signature(TernaryBeat(lanes)))}
        if self.serial:
            members["o_stream"] = Out(stream.Signature(signed(acc_width)))
            members["flush"] = In(1)
        else:
            members["o_stream"] = Out(stream.Signature(data.ArrayLayout(signed(acc_width), lanes)))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        beat = self.i_stream.p
        out = self.o_stream

        # Stage 1: per-lane addend. -A is computed once and shared by all lanes.
        s1_valid = Signal()
        s1_last = Signal()
        addend = [Signal(signed(ACT_BITS), name=f"addend{k}") for k in range(self.lanes)]
        neg_act = Signal(signed(ACT_BITS))
        m.d.comb += neg_act.eq(-beat.act)

        # Control flags are each one LUT of registers (plus the input's valid/first for clear):
        # they drive the enables of every lane's flip-flops.
        stall = Signal()        # stage 1 holds a last beat but the output register is full
        advance = Signal()      # stage 1's beat is added this cycle
        emit = Signal()         # ... and it is the group's last: the sums go to the output
        m.d.comb += [
            stall.eq(s1_valid & s1_last & out.valid),
            advance.eq(s1_valid & ~(s1_last & out.valid)),
            emit.eq(s1_valid & s1_last & ~out.valid),
            self.i_stream.ready.eq(~stall),
        ]

        with m.If(~stall):
            m.d.sync += [s1_valid.eq(self.i_stream.valid), s1_last.eq(beat.last)]
            for k in range(self.lanes):
                with m.Switch(beat.trits[2 * k:2 * k + 2]):
                    with m.Case(TRIT_PLUS):
                        m.d.sync += addend[k].eq(beat.act)
                    with m.Case(TRIT_MINUS):
                        m.d.sync += addend[k].eq(neg_act)
                    with m.Default():           # 00, and the invalid 10
                        m.d.sync += addend[k].eq(0)

        # Stage 2: accumulate. Clearing uses the flip-flops' synchronous reset (free on iCE40)
        # rather than a "first ? 0 : acc" mux in front of every adder: the accumulators are
        # zeroed when a group completes, and when a first beat enters stage 1 (abandoning any
        # group that never saw its last beat).
        clear = Signal()
        m.d.comb += clear.eq(emit | (self.i_stream.valid & beat.first & ~stall))
        held = [Signal(signed(self.acc_width), name=f"out{k}") for k in range(self.lanes)]
        take = out.valid & out.ready
        for k in range(self.lanes):
            acc = Signal(signed(self.acc_width), name=f"acc{k}")
            total = Signal(signed(self.acc_width), name=f"total{k}")
            m.d.comb += total.eq(acc + addend[k])
            with m.If(clear):
                m.d.sync += acc.eq(0)
            with m.Elif(advance):
                m.d.sync += acc.eq(total)
            with m.If(emit):
                m.d.sync += held[k].eq(total)
            if self.serial:
                # a shift register: each transfer moves the next lane's sum to the head (the
                # LUT in front of each flip-flop shares its logic cell: no cell per bit added)
                with m.Elif(take):
                    m.d.sync += held[k].eq(held[k + 1] if k + 1 < self.lanes else 0)

        if self.serial:
            m.d.comb += out.payload.eq(held[0])
            taken = Signal(range(self.lanes))           # sums of the group already taken
            with m.If(emit):
                m.d.sync += [out.valid.eq(1), taken.eq(0)]
            with m.Elif((take & (taken == self.lanes - 1)) | self.flush):
                m.d.sync += out.valid.eq(0)
            with m.Elif(take):
                m.d.sync += taken.eq(taken + 1)
        else:
            m.d.comb += [out.payload[k].eq(held[k]) for k in range(self.lanes)]
            # emit implies the output register is empty (else stage 1 would stall), so it wins.
            with m.If(emit):
                m.d.sync += out.valid.eq(1)
            with m.Elif(out.ready):
                m.d.sync += out.valid.eq(0)
        return m
