"""BitLinear's per-vector scalars: ``firmware.valu.bitlinear_scalars`` in a small sequential unit
(the quantizer's ``sh``, ``qm``, ``qs``, reciprocal and ``arith.rescale_factor``), bit for bit."""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.models.arith import ACT_MAX, QUANT_BITS, QUANT_SHIFT

__all__ = ["BitLinearScalars", "ScalarsRequest", "ScalarsResult", "scalars_cycles",
           "MV_BITS", "Z_BITS"]

MV_BITS = 31                        # mv = max|x·g| <= 2**30
_MANT_BITS = 16                     # mant, gamma_mant, qm, recip, s
_E_BITS = 6
_SCALE_EXP_BITS = 8
_SH_MIN = 1 - QUANT_BITS            # sh = bitlen(mv) - 15: -14 .. 16
_SH_START = MV_BITS - QUANT_BITS    # 16: sh before the first normalizing shift
Z_BITS = 9                          # z in [-175, 204] for any e, scale_exp (docstring)
_RECIP_DIVIDEND = ACT_MAX << QUANT_SHIFT
# the dividend's bits above the 16 quotient bits (its low 16 bits are zero): the first remainder
_R_START = _RECIP_DIVIDEND >> _MANT_BITS
_R_BITS = QUANT_BITS                # the remainder is below mvn < 2**15
_RN_START = ~_R_START & ((1 << _R_BITS) - 1)
_FIXED_CYCLES = 82                  # accept edge -> take edge, besides the k shifts
_K_MAX = _SH_START - _SH_MIN         # 30 normalizing shifts at most (mv = 0 and 1)

assert _R_START < 1 << (QUANT_BITS - 1)        # the quotient fits 16 bits for every mvn >= 2**14
assert _RECIP_DIVIDEND & ((1 << _MANT_BITS) - 1) == 0


def scalars_cycles(mv: int) -> int:
    """Clock edges from the one that accepts a request to the first one that can take its result
    (the transfer edge when ``o_stream.ready`` is high): ``82 + k`` with ``k = 31 - bitlen(mv)``
    normalizing shifts, at most 30 (``mv`` = 0 and 1 both take 30)."""
    return _FIXED_CYCLES + min(MV_BITS - mv.bit_length(), _K_MAX)


class ScalarsRequest(data.StructLayout):
    """``mv = max|x·g|`` (31 bits), the norm statistics ``mant`` (16) and ``e`` (6, unsigned) and
    the projection's ``gamma_mant`` (16) and ``scale_exp`` (signed 8)."""

    def __init__(self):
        super().__init__({
            "mv": unsigned(MV_BITS), "mant": unsigned(_MANT_BITS), "e": unsigned(_E_BITS),
            "gamma_mant": unsigned(_MANT_BITS), "scale_exp": signed(_SCALE_EXP_BITS),
        })


class ScalarsResult(data.StructLayout):
    """``sh`` (signed 6), ``qm`` = ``2**max(-sh, 0)``, ``qs`` = ``max(sh, 0)``, ``recip``, ``s``,
    ``zs`` = ``min(max(z, 0), 63)`` and ``zb`` (2 when ``z < 0``, else 1)."""

    def __init__(self):
        super().__init__({
            "sh": signed(6), "qm": unsigned(_MANT_BITS), "qs": unsigned(5),
            "recip": unsigned(_MANT_BITS), "s": unsigned(_MANT_BITS),
            "zs": unsigned(6), "zb": unsigned(2),
        })


class BitLinearScalars(wiring.Component):
    """``firmware.valu.bitlinear_scalars(mv, mant, e, gamma_mant, scale_exp)``, sequentially.

    Ports
    -----
    i_stream : In(stream.Signature(ScalarsRequest()))
        One request: ``mv`` (unsigned 31), ``mant`` (unsigned 16, any value), ``e`` (unsigned
        6, any value), ``gamma_mant`` (unsigned 16, any value), ``scale_exp`` (signed 8, any
        value). ``i_stream.ready`` is high only while the unit is idle (no request in progress
        and no result waiting); the payload is captured on the accepting edge.
    o_stream : Out(stream.Signature(ScalarsResult()))
        ``{sh, qm, qs, recip, s, zs, zb}`` exactly as ``bitlinear_scalars`` returns them (``z``
        itself is represented by ``zs``, ``zb``; it lies in [-175, 204] over the whole input
        range, so signed 9 bits hold it). Held until taken; ``o_stream.ready`` may drop at any
        time. ``mv == 0`` gives ``sh = 0, qm = 1, qs = 0, recip = 0, s = 0, zs = 0, zb = 1``.

    Timing
    ------
    ``scalars_cycles(mv)`` = 82 + k clock edges from the edge that accepts a request to the
    first edge that can take its result (``o_stream.valid`` rises one cycle earlier), with k =
    31 - bitlen(mv) normalizing shifts (0 .. 30; ``mv`` = 0 takes 30, like ``mv`` = 1): 82 ..
    ``max_cycles`` = 112. Only k varies: 1 + (k + 1) cycles of normalization, then five
    16-cycle phases (MUL1, TRUNC1, MUL2, TRUNC2, DIV). One request at a time: ``i_stream.ready``
    returns on the edge that takes the result.

    Arithmetic
    ----------
    A 31-bit register normalizes ``mv`` by left shifts until its top bit is set (k shifts; ``sh
    = 16 - k`` counts down; ``mvn`` is its top 15 bits; no top bit after 30 shifts means ``mv ==
    0``). A shift-and-add multiplier (16 cycles, the operand gated into the adder so the sum
    feeds the register directly) computes ``mvn · mant`` into ``{hi, lo}`` (``lo`` starts as
    ``mant``); TRUNC1 shifts ``{hi, lo}`` right while ``hi != 0`` (``t1`` shifts) within a
    16-cycle window, leaving ``top16(p1)`` in ``lo``; MUL2 multiplies it by ``gamma_mant``
    (latched in the quotient register) and TRUNC2 leaves ``S`` in ``lo``. DIV is a 16-step
    restoring division of the constant ``127·2**23`` by ``mvn``: its low 16 dividend bits are
    zero, so the remainder starts at ``127·2**23 >> 16`` (< 2**14 <= mvn); the remainder is
    kept complemented so that ``2r - mvn`` is one addition, ``~(2r) + mvn``. The quotient bits
    shift into the ``gamma_mant`` register (forced to 0 for ``mv == 0``). Meanwhile ``hi`` (0
    by then) shifts right and takes a single 1 at DIV cycle ``max(-sh, 0)``, which leaves
    ``qm`` in it. ``z`` only counts up: it is 0 while idle, the accepting edge adds ``e +
    scale_exp - 64`` (``e - 64`` is ``e`` with bits 6..8 set), then +1 per normalizing shift,
    per MUL1 cycle and per TRUNC cycle without a shift (16 - t1 and 16 - t2 of them), giving
    ``e + scale_exp - 16 + k - t1 - t2``; for ``mv == 0`` it is cleared at the end. Over the
    whole input range z is in [-175, 204] (the count starts at >= -192), signed 9 bits. No
    SB_MAC16, no EBR.

    Resources (iCE40UP5K, ``hdl/synth.py``, 30 MHz target): about 120 FF and 195 LUT4 in 208
    logic cells, 58 carries, no SB_MAC16 or EBR; Fmax about 55 MHz.
    """

    max_cycles = _FIXED_CYCLES + _K_MAX         # 112

    def __init__(self):
        super().__init__({
            "i_stream": In(stream.Signature(ScalarsRequest())),
            "o_stream": Out(stream.Signature(ScalarsResult())),
        })

    def elaborate(self, platform):
        m = Module()
        # datapath registers need no reset: every request loads them
        x = Signal(MV_BITS, reset_less=True)    # mv, shifted left until x[30]; mvn = x[16:]
        mvn = x[MV_BITS - QUANT_BITS:]
        nonzero = x[-1]                         # after the normalization: mv != 0
        hi = Signal(_MANT_BITS, reset_less=True)    # product {hi, lo}; finally qm
        lo = Signal(_MANT_BITS, reset_less=True)    # mant, then p1, top16(p1), p2, S
        q = Signal(_MANT_BITS, reset_less=True)     # gamma_mant, then the quotient (recip)
        rn = Signal(_R_BITS, reset_less=True)       # ~remainder (see "Arithmetic")
        sh = Signal(signed(6), reset_less=True)
        z = Signal(signed(Z_BITS))          # 0 while idle (cleared when the result is taken)
        step = Signal(7, reset_less=True)   # RUN: phase (MUL1, TRUNC1, MUL2, TRUNC2, DIV), cycle
        cnt = step[:4]
        norm, run, valid = Signal(), Signal(), Signal()

        p = self.i_stream.p
        o = self.o_stream.p
        neg = z[-1]
        over = ~neg & z[6:].any()
        m.d.comb += [
            o.sh.eq(sh), o.qm.eq(hi), o.qs.eq(Mux(sh[-1], 0, sh[:5])), o.recip.eq(q), o.s.eq(lo),
            o.zs.eq(Mux(neg, 0, Mux(over, 63, z[:6]))), o.zb.eq(Cat(~neg, neg)),
            self.o_stream.valid.eq(valid),
            self.i_stream.ready.eq(~(norm | run | valid)),
        ]
        accept = self.i_stream.valid & self.i_stream.ready
        taken = self.o_stream.valid & self.o_stream.ready

        mul = run & ~step[4] & ~step[6]
        trunc = run & step[4]
        div = run & step[6]
        last = div & cnt.all()
        # sh == -14 after 30 shifts; this bit test is true for no earlier sh (16 .. -13)
        limit = sh[5] & ~sh[3] & ~sh[2] & ~sh[0]
        shift = norm & ~nonzero & ~limit

        # shift-and-add multiply step (gate = multiplier bit) or a plain right shift (gate = 0)
        gate = mul & lo[0]
        operand = Signal(_MANT_BITS)
        m.d.comb += operand.eq(Mux(gate, Mux(step[5], q, mvn), 0))
        total = Signal(_MANT_BITS + 1)
        m.d.comb += total.eq(hi + operand)
        # during DIV hi (0 by then) shifts right and takes one 1 at cycle max(-sh, 0): qm
        mark = div & (cnt == Mux(sh[-1], -sh, 0)[:4])
        with m.If(accept):
            m.d.sync += [hi.eq(0), lo.eq(p.mant)]
        with m.Else():
            with m.If(mul | (trunc & hi.any()) | div):       # the operand is 0 in DIV
                m.d.sync += hi.eq(Cat(total[1:16], total[16] | mark))
            with m.If(mul | (trunc & hi.any())):
                m.d.sync += lo.eq(Cat(lo[1:], total[0]))

        # restoring division on the complement: ~(2r) + mvn = 2**16 - 1 - (2r - mvn)
        dsum = Signal(_R_BITS + 2)
        m.d.comb += dsum.eq(Cat(C(1, 1), rn) + mvn)
        fits = ~dsum[-1]                    # 2r >= mvn
        with m.If(accept):
            m.d.sync += [q.eq(p.gamma_mant), rn.eq(_RN_START)]
        with m.Elif(div):
            m.d.sync += [rn.eq(Mux(fits, dsum, Cat(C(1, 1), rn))), q.eq(Cat(fits & nonzero, q))]

        with m.If(accept):
            m.d.sync += [x.eq(p.mv), sh.eq(_SH_START), step.eq(0)]
        with m.Elif(shift):
            m.d.sync += [x.eq(x << 1), sh.eq(sh - 1)]
        with m.Elif(norm & ~nonzero):                  # mv == 0
            m.d.sync += sh.eq(0)
        with m.If(run):
            m.d.sync += step.eq(step + 1)

        # z counts up: +1 per normalizing shift, per MUL1 cycle and per idle truncation cycle
        # (16 - t1, 16 - t2); it is 0 at accept, so the same adder loads e + scale_exp - 64
        z_inc = shift | (mul & ~step[5]) | (trunc & ~hi.any())
        with m.If(accept | z_inc):
            m.d.sync += z.eq(z + Mux(accept, p.scale_exp + Cat(p.e, C(0b111, 3)), 1))
        with m.If(taken | (last & ~nonzero)):
            m.d.sync += z.eq(0)

        with m.If(accept):
            m.d.sync += norm.eq(1)
        with m.If(norm & (nonzero | limit)):
            m.d.sync += [norm.eq(0), run.eq(1)]
        with m.If(last):
            m.d.sync += [run.eq(0), valid.eq(1)]
        with m.If(taken):
            m.d.sync += valid.eq(0)
        return m
