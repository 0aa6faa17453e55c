"""BitLinear's activation quantizer: absmax int8 quantization of ``x ∘ g``, bit for bit
``arith.quantize_activations`` (docs/arithmetic.md, "BitLinear", step 2)."""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.hdl.primitives import SeqDivider, bit_length
from mmfree.models.arith import ACT_MAX, QUANT_BITS, QUANT_SHIFT

__all__ = ["Quantizer", "QuantizerBeat", "ActivationBeat", "MAX_N_LIMIT",
           "X_BITS", "MAG_BITS", "SH_BITS", "SH_MIN", "SH_MAX", "ACT_BITS"]

X_BITS = 16                                   # x and g are int16
MAG_BITS = 2 * X_BITS - 1                     # |v| = |x|·|g| <= 2**30 (-32768²): 31 bits
SH_MIN = 1 - QUANT_BITS                       # sh = bitlen(mv) - 15 for mv >= 1: -14 ..
SH_MAX = MAG_BITS - QUANT_BITS                # .. 16
SH_BITS = 6                                   # signed(6) holds [-32, 31]
ACT_BITS = 8                                  # A is int8 (-128 never occurs)
RECIP_DIVIDEND = ACT_MAX << QUANT_SHIFT       # recip = (127 · 2**23) // mvn
RECIP_BITS = (RECIP_DIVIDEND >> (QUANT_BITS - 1)).bit_length()   # mvn >= 2**14: 16 bits
MAX_N_LIMIT = 1 << 16
_PRODUCT_BITS = (RECIP_DIVIDEND).bit_length()  # |vn|·recip <= 127·2**23: 30 bits
_COARSE = 3                                   # the normalizing shifter's low (fine) shift bits
_SPLIT = 16                                   # compares and bitlen(mv) on halves of |v|

assert SH_MIN >= -(1 << (SH_BITS - 1)) and SH_MAX < (1 << (SH_BITS - 1))


def _compare(a, b):
    """The parts of an unsigned ``a > b`` from two half-width compares (two short carry chains
    instead of a long one): ``Cat(lo_gt, hi_eq, hi_gt)``, to be registered; see :func:`_greater`."""
    return Cat(a[:_SPLIT] > b[:_SPLIT], a[_SPLIT:] == b[_SPLIT:], a[_SPLIT:] > b[_SPLIT:])


def _greater(parts):
    return parts[2] | (parts[1] & parts[0])


class QuantizerBeat(data.StructLayout):
    """One element of the input vector: ``x`` and the norm weight ``g`` (int16), ``last``."""

    def __init__(self):
        super().__init__({"x": signed(X_BITS), "g": signed(X_BITS), "last": 1})


class ActivationBeat(data.StructLayout):
    """One int8 activation ``a`` in [-127, 127]; ``last`` on the vector's final element."""

    def __init__(self):
        super().__init__({"a": signed(ACT_BITS), "last": 1})


class _Stored(data.StructLayout):
    def __init__(self):
        super().__init__({"mag": unsigned(MAG_BITS), "neg": 1})


class Quantizer(wiring.Component):
    """Absmax int8 quantization of ``v = x ∘ g``: ``arith.quantize_activations(x, g)``.

    The caller streams each vector once; the unit buffers ``|v|`` and its sign in an internal
    memory (``max_n`` words of 32 bits: ``2·ceil(max_n/256)`` EBR on the iCE40; 4 for 512) while
    it tracks ``mv = max|v|``, then normalizes, divides and streams the activations out. The
    memory is the only buffer: the next vector refills it behind the read-out.

    Parameters
    ----------
    max_n : int
        Longest vector, 1 .. 65536 (the memory depth).

    Ports
    -----
    i_stream : In(stream.Signature(QuantizerBeat()))
        ``{x, g, last}``, int16 each; ``last`` on the vector's final element. A vector ends at
        ``last`` or at its ``max_n``-th element, whichever comes first (a longer vector is a
        caller error; its remainder becomes the next vector).
    o_stream : Out(stream.Signature(ActivationBeat()))
        ``{a, last}``: one int8 activation per element, in input order, ``last`` on the final one.
    mvn : Out(15), sh : Out(signed(6))
        The vector's scale results, as ``arith.quantize_activations`` returns them: ``mvn`` in
        [2**14, 2**15) and ``sh`` in [-14, 16] (both 0 for an all-zero vector). Held ports: set
        before the vector's first activation is valid and held until the next vector's max is
        known, which is never before this vector's last activation has been taken (so they are
        valid with every activation beat of their vector).

    Arithmetic
    ----------
    ``|v| = |x|·|g|`` (unsigned 16x16 on an SB_MAC16; the sign is ``sign(x) xor sign(g)``), ``mv``
    by a registered compare per element (|v| can be 2**30, for -32768·-32768: 31 bits),
    ``sh = bitlen(mv) - 15`` (:func:`bit_length` on each half of mv), ``|vn| = |v| >> sh``
    (``<< -sh`` for sh < 0) on a two-stage shifter that also computes ``mvn`` from ``mv``;
    ``recip = (127·2**23) // mvn`` on a :class:`SeqDivider` (30 / 15 bits); ``|vn|·recip`` on an
    SB_MAC16 (15 x 16 bits, unsigned) and ``A = (vn·recip + 2**22) >> 23`` computed on the
    magnitude as ``±((|vn|·recip + 2**22 - neg) >> 23)``, the same floor for both signs. The
    activation of largest |v| is ±127; -128 never occurs.
    Multipliers have registered inputs and outputs (reset-less, so they fold into SB_MAC16).

    Timing
    ------
    Input: one element per cycle. After a vector's final element ``i_stream.ready`` stays low
    until that vector's read-out begins; the next vector then streams in behind the read-out
    (element j once address j has been read), so its input overlaps the previous output.
    Latency: the first activation is valid ``LATENCY`` = 49 cycles after the final element
    was accepted, when the previous vector has left the unit.
    Output: one activation per cycle while ``o_stream.ready`` is high; ``o_stream.ready`` may drop
    at any time (the read-out pipeline stalls as a whole; ``i_stream.ready`` depends on it only
    through registers). Back to back, vectors of n elements take ``n + PERIOD_EXTRA`` = n + 45
    cycles each.

    Resources (iCE40UP5K, max_n 512, ``hdl/synth.py``): 2 SB_MAC16, 4 EBR, about 640 LUT4 and
    410 FF (890 logic cells); 52 MHz.
    """

    LATENCY = 49          # final element accepted -> first activation valid (documented above)
    PERIOD_EXTRA = 45     # back-to-back vectors of n elements: one every n + 45 cycles

    def __init__(self, max_n: int):
        if not isinstance(max_n, int) or not 1 <= max_n <= MAX_N_LIMIT:
            raise ValueError(f"Quantizer max_n must be an integer from 1 to {MAX_N_LIMIT} (the "
                             f"longest vector it buffers), not {max_n!r}")
        self.max_n = max_n
        super().__init__({
            "i_stream": In(stream.Signature(QuantizerBeat())),
            "o_stream": Out(stream.Signature(ActivationBeat())),
            "mvn": Out(unsigned(QUANT_BITS)),
            "sh": Out(signed(SH_BITS)),
        })

    def elaborate(self, platform):
        m = Module()
        max_n = self.max_n
        m.submodules.mem = mem = memory.Memory(shape=_Stored(), depth=max_n, init=[])
        wr = mem.write_port()
        rd = mem.read_port()                       # registered output (EBR)
        m.submodules.divider = div = SeqDivider(RECIP_DIVIDEND.bit_length(), QUANT_BITS)

        mv = Signal(MAG_BITS)                      # running max|v| of the vector being filled
        last_addr = Signal(range(max_n))           # address of the filled vector's final element
        drain_last = Signal(range(max_n))          # .. and of the vector being read out
        sh = Signal(signed(SH_BITS))
        shift = Signal(range(MAG_BITS))            # sh + 14: the normalizer's right shift
        mvn = Signal(QUANT_BITS)
        recip = Signal(RECIP_BITS, reset_less=True)
        m.d.comb += [self.mvn.eq(mvn), self.sh.eq(sh)]

        # ---- fill: |x|·|g| into the memory, max tracking --------------------------------------
        in_count = Signal(range(max_n))
        first_in = Signal(init=1)                  # in_count == 0 and == max_n - 1, registered
        at_max = Signal(init=max_n == 1)
        last_in = Signal()
        accept = Signal()
        p = self.i_stream.p
        m.d.comb += [
            last_in.eq(p.last | at_max),
            accept.eq(self.i_stream.valid & self.i_stream.ready),
        ]
        with m.If(accept):
            m.d.sync += [
                in_count.eq(Mux(last_in, 0, in_count + 1)),
                first_in.eq(last_in),
                at_max.eq(Mux(last_in, max_n == 1, in_count == max_n - 2)),
            ]

        f1_valid, f1_last, f1_first, f1_neg = Signal(), Signal(), Signal(), Signal()
        f1_x = Signal(X_BITS, reset_less=True)     # |x|, |g|: -32768 gives 32768, fits 16 bits
        f1_g = Signal(X_BITS, reset_less=True)
        m.d.sync += [
            f1_valid.eq(accept), f1_last.eq(last_in), f1_first.eq(first_in),
            f1_neg.eq(p.x[-1] ^ p.g[-1]),
            f1_x.eq(Mux(p.x[-1], -p.x, p.x)), f1_g.eq(Mux(p.g[-1], -p.g, p.g)),
        ]
        f2_valid, f2_last, f2_first, f2_neg = Signal(), Signal(), Signal(), Signal()
        f2_mag = Signal(MAG_BITS, reset_less=True)
        m.d.sync += [
            f2_valid.eq(f1_valid), f2_last.eq(f1_last), f2_first.eq(f1_first),
            f2_neg.eq(f1_neg), f2_mag.eq(f1_x * f1_g),
        ]
        wr_addr = Signal(range(max_n))
        m.d.comb += [
            wr.addr.eq(wr_addr), wr.en.eq(f2_valid),
            wr.data.mag.eq(f2_mag), wr.data.neg.eq(f2_neg),
        ]
        with m.If(f2_valid):
            m.d.sync += wr_addr.eq(Mux(f2_last, 0, wr_addr + 1))
            with m.If(f2_last):
                m.d.sync += last_addr.eq(wr_addr)

        # Running max. A compare, the load decision and the enable fan-out of mv in one cycle
        # miss 48 MHz, so f2 only compares (in halves, registered) and f3 decides: f3 loads mv
        # with its element if that exceeds the max so far, which is the previous element (then
        # in f3, compared in f2 as well) if that one was loaded, else mv.
        f3_valid, f3_first, f3_load, prev_load = Signal(), Signal(), Signal(), Signal()
        f3_mag = Signal(MAG_BITS)
        f3_vs_mv, f3_vs_prev = Signal(3), Signal(3)
        m.d.sync += [
            f3_valid.eq(f2_valid), f3_first.eq(f2_first), f3_mag.eq(f2_mag),
            f3_vs_mv.eq(_compare(f2_mag, mv)), f3_vs_prev.eq(_compare(f2_mag, f3_mag)),
            prev_load.eq(f3_load),
        ]
        m.d.comb += f3_load.eq(f3_valid & (f3_first | Mux(prev_load, _greater(f3_vs_prev),
                                                          _greater(f3_vs_mv))))
        with m.If(f3_load):
            m.d.sync += mv.eq(f3_mag)

        # ---- read-out: memory -> normalize -> ·recip -> round --------------------------------
        # All stages advance together when the output register is free or being taken.
        en = Signal()
        m.d.comb += en.eq(~self.o_stream.valid | self.o_stream.ready)
        rd_addr = Signal(range(max_n))
        issue = Signal()                           # a read of rd_addr enters the pipeline
        norm_mv = Signal()                         # the normalizer shifts mv instead (-> mvn)
        m.d.comb += [rd.addr.eq(rd_addr), rd.en.eq(en)]

        s1_valid, s1_last = Signal(), Signal()     # rd.data is this stage's payload
        with m.If(en):
            m.d.sync += [s1_valid.eq(issue), s1_last.eq(rd_addr == drain_last)]

        # |vn| = ((|v| << 14) >> shift)[:15], shift = sh + 14 in 0..30: coarse, then fine
        src = Mux(norm_mv, mv, rd.data.mag)
        wide = Cat(C(0, QUANT_BITS - 1), src)
        s2_valid, s2_last, s2_neg = Signal(), Signal(), Signal()
        s2_part = Signal(QUANT_BITS + (1 << _COARSE) - 1)
        with m.If(en):
            m.d.sync += [
                s2_valid.eq(s1_valid), s2_last.eq(s1_last), s2_neg.eq(rd.data.neg),
                s2_part.eq(wide >> Cat(C(0, _COARSE), shift[_COARSE:])),
            ]
        s3_valid, s3_last, s3_neg = Signal(), Signal(), Signal()
        s3_vn = Signal(QUANT_BITS, reset_less=True)
        with m.If(en):
            m.d.sync += [
                s3_valid.eq(s2_valid), s3_last.eq(s2_last), s3_neg.eq(s2_neg),
                s3_vn.eq(s2_part >> shift[:_COARSE]),
            ]
        s4_valid, s4_last, s4_neg = Signal(), Signal(), Signal()
        s4_prod = Signal(_PRODUCT_BITS, reset_less=True)
        with m.If(en):
            m.d.sync += [
                s4_valid.eq(s3_valid), s4_last.eq(s3_last), s4_neg.eq(s3_neg),
                s4_prod.eq(s3_vn * recip),
            ]
        # (vn·recip + 2**22) >> 23 = ±((|vn|·recip + 2**22 - neg) >> 23), the same floor for
        # either sign: the top bits plus a carry, which is bit 22 (the half) except for a
        # negative value on an exact half (no lower bit set), which rounds towards zero.
        s5_valid, s5_last, s5_neg = Signal(), Signal(), Signal()
        s5_mag = Signal(ACT_MAX.bit_length())
        half = s4_prod[QUANT_SHIFT - 1] & (~s4_neg | s4_prod[:QUANT_SHIFT - 1].any())
        with m.If(en):
            m.d.sync += [
                s5_valid.eq(s4_valid), s5_last.eq(s4_last), s5_neg.eq(s4_neg),
                s5_mag.eq(s4_prod[QUANT_SHIFT:] + half),
            ]
        with m.If(en):
            m.d.sync += [
                self.o_stream.valid.eq(s5_valid), self.o_stream.p.last.eq(s5_last),
                self.o_stream.p.a.eq(Mux(s5_neg, -s5_mag, s5_mag)),
            ]
        drained = ~(s1_valid | s2_valid | s3_valid | s4_valid | s5_valid | self.o_stream.valid)

        # ---- control ---------------------------------------------------------------------------
        bitlen_hi = bit_length(m, mv[_SPLIT:], name="bitlen_hi")
        bitlen_lo = bit_length(m, mv[:_SPLIT], name="bitlen_lo")
        bl_hi, bl_lo = Signal.like(bitlen_hi), Signal.like(bitlen_lo)
        bl = Signal(range(MAG_BITS + 1))
        m.d.comb += [
            div.i_stream.p.dividend.eq(RECIP_DIVIDEND),
            div.i_stream.p.divisor.eq(mvn),
        ]
        # The memory is refilled behind the read-out: element j of the next vector is taken
        # once the read of address j has been issued (it is written 2 cycles later). `room` is
        # that test a cycle late, with a margin of one for the element taken meanwhile; rd_addr
        # is 0 outside DRAIN, so it is false when DRAIN begins.
        filling = Signal(init=1)                   # the vector being filled is still open
        room = Signal()
        m.d.sync += room.eq(in_count + 1 < rd_addr)
        m.d.comb += self.i_stream.ready.eq(filling & (~issue | room))
        with m.If(accept & last_in):
            m.d.sync += filling.eq(0)
        with m.FSM(init="WAIT_FILL"):
            with m.State("WAIT_FILL"):
                with m.If(~filling):
                    m.next = "TAIL"
            with m.State("TAIL"):
                # the final element is written and the previous vector has left the pipeline
                with m.If(~f1_valid & ~f2_valid & ~f3_valid & drained):
                    m.next = "SCALE"
            with m.State("SCALE"):
                # bitlen(mv) in two registered steps (a 31-bit priority encoder is too slow)
                m.d.sync += [bl_hi.eq(bitlen_hi), bl_lo.eq(bitlen_lo)]
                m.next = "BITLEN"
            with m.State("BITLEN"):
                m.d.sync += bl.eq(Mux(bl_hi != 0, bl_hi + _SPLIT, bl_lo))
                m.next = "SH"
            with m.State("SH"):
                with m.If(bl == 0):                # arith: an all-zero vector has mvn = sh = 0
                    m.d.sync += [sh.eq(0), shift.eq(QUANT_BITS - 1)]
                with m.Else():
                    m.d.sync += [sh.eq(bl - QUANT_BITS), shift.eq(bl - 1)]
                m.next = "NORM_MV"
            with m.State("NORM_MV"):
                m.d.comb += norm_mv.eq(1)          # mv enters the empty shifter (en is high)
                m.next = "NORM_WAIT"
            with m.State("NORM_WAIT"):
                m.next = "NORM_TAKE"
            with m.State("NORM_TAKE"):
                m.d.sync += mvn.eq(s3_vn)
                m.next = "DIVIDE"
            with m.State("DIVIDE"):
                # mvn = 0 (all-zero vector) gives an all-ones quotient; every |vn| is 0 then
                m.d.comb += div.i_stream.valid.eq(1)
                with m.If(div.i_stream.ready):
                    m.next = "DIVIDE_WAIT"
            with m.State("DIVIDE_WAIT"):
                m.d.comb += div.o_stream.ready.eq(1)
                with m.If(div.o_stream.valid):
                    m.d.sync += [recip.eq(div.o_stream.p.quotient[:RECIP_BITS]),
                                 drain_last.eq(last_addr), filling.eq(1)]
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                m.d.comb += issue.eq(1)
                with m.If(en):
                    m.d.sync += rd_addr.eq(rd_addr + 1)
                    with m.If(rd_addr == drain_last):
                        m.d.sync += rd_addr.eq(0)
                        m.next = "WAIT_FILL"
        return m
