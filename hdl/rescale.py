"""BitLinear's output rescale: ``arith.rescale_factor`` once per vector, then ``arith.rescale``
on every accumulator sum, bit for bit (docs/arithmetic.md, "BitLinear", steps 4 and 5)."""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.hdl.quantizer import SH_BITS
from mmfree.models import arith
from mmfree.models.arith import QUANT_BITS

__all__ = ["Rescale", "RescaleParams", "AccBeat", "RescaleBeat", "rescale_widths",
           "MANT_BITS", "E_BITS", "SCALE_EXP_BITS", "S_BITS", "Z_SHAPE", "Z_MIN", "Z_MAX",
           "OUT_BITS", "ACC_WIDTH_MIN", "ACC_WIDTH_MAX", "FACTOR_CYCLES_MAX",
           "factor_cycles"]

MANT_BITS = 16                                        # mant and gamma_mant: uint16
E_BITS = arith.irsqrt((1 << 62) - 1)[1].bit_length()  # irsqrt's largest e (46): 6 bits
SCALE_EXP_BITS = 8                                    # scale_exp: signed(8)
S_BITS = 16
OUT_BITS = 16
Z_MIN, Z_MAX = -16, 62                                # arith.rescale clamps z to this range
ACC_WIDTH_MIN, ACC_WIDTH_MAX = 2, 32                  # |acc| splits into two 16-bit halves
_P1_BITS = QUANT_BITS + MANT_BITS                     # mvn·mant < 2**31: t1 <= 15
_P2_BITS = S_BITS + MANT_BITS                         # p1'·gamma_mant < 2**32: t2 <= 16
# z = e + scale_exp - sh - t1 - t2 over the port ranges (unclamped, as rescale_factor returns it)
_Z_LO = (-(1 << (SCALE_EXP_BITS - 1)) - ((1 << (SH_BITS - 1)) - 1)
         - (_P1_BITS - 16) - (_P2_BITS - 16))
_Z_HI = (1 << E_BITS) - 1 + (1 << (SCALE_EXP_BITS - 1)) - 1 + (1 << (SH_BITS - 1))
Z_SHAPE = Shape.cast(range(_Z_LO, _Z_HI + 1))
_T_BITS = OUT_BITS + 2          # the shifted product's bits that reach the output when in range
_SAT_S = 1 << (OUT_BITS - 1)    # left shifts saturate S here (see Rescale, "Arithmetic")
_FACTOR_FIXED = 40              # the factor's cycles besides its data-dependent loops


def factor_cycles(mvn: int, sh: int, mant: int, e: int, gamma_mant: int, scale_exp: int) -> int:
    """Cycles from the accepted parameter beat to the first cycle an element of that vector can
    be accepted (when the previous vector has ended): two 16-step multiplies, ``t1 + t2``
    normalizing steps, ``max(0, -z)`` left shifts of S (z clamped to >= -16) and 8 more."""
    t1 = max((mvn * mant).bit_length() - 16, 0)
    t2 = max((((mvn * mant) >> t1) * gamma_mant).bit_length() - 16, 0)
    _, z = arith.rescale_factor(mvn, sh, mant, e, gamma_mant, scale_exp)
    return _FACTOR_FIXED + t1 + t2 + max(0, -max(z, Z_MIN))


FACTOR_CYCLES_MAX = _FACTOR_FIXED + (_P1_BITS - 16) + (_P2_BITS - 16) - Z_MIN


def rescale_widths(acc_width: int) -> tuple[int, int]:
    """``(product_bits, max_right_shift)`` of the element datapath: ``acc · S`` is a signed
    ``acc_width + 16``-bit value, and shifting it right by ``acc_width + 15`` leaves only its
    sign, so larger shifts are clamped there."""
    return acc_width + S_BITS, acc_width + S_BITS - 1


class RescaleParams(data.StructLayout):
    """The per-vector inputs of ``arith.rescale_factor``: ``mvn``, ``sh`` (from the quantizer),
    ``mant``, ``e`` (the norm statistics), ``gamma_mant``, ``scale_exp`` (per projection)."""

    def __init__(self):
        super().__init__({
            "mvn": unsigned(QUANT_BITS), "sh": signed(SH_BITS),
            "mant": unsigned(MANT_BITS), "e": unsigned(E_BITS),
            "gamma_mant": unsigned(MANT_BITS), "scale_exp": signed(SCALE_EXP_BITS),
        })


class AccBeat(data.StructLayout):
    """One accumulator sum ``acc`` (``acc_width`` bits, signed); ``last`` on a vector's final."""

    def __init__(self, acc_width: int):
        super().__init__({"acc": signed(acc_width), "last": 1})


class RescaleBeat(data.StructLayout):
    """One output ``y`` (int16) and the ``last`` flag of its input."""

    def __init__(self):
        super().__init__({"y": signed(OUT_BITS), "last": 1})


class Rescale(wiring.Component):
    """``out = arith.rescale(acc, *arith.rescale_factor(mvn, sh, mant, e, gamma_mant, scale_exp))``.

    Parameters
    ----------
    acc_width : int
        Width of the signed accumulator sums, 2 .. 32 (``TernaryCore.acc_width``; 17 for 512
        inputs).

    Ports
    -----
    i_params : In(stream.Signature(RescaleParams()))
        One beat per vector: ``mvn`` (15 bits), ``sh`` (signed 6), ``mant`` (16), ``e`` (6
        unsigned), ``gamma_mant`` (16), ``scale_exp`` (signed 8). Parameter beat k applies to
        vector k of ``i_stream``, i.e. to the elements after the (k-1)-th ``last`` up to and
        including the k-th. A beat may be sent any time after the previous one was accepted:
        the factor is computed in the background into a second register set while the current
        vector streams; ``i_params.ready`` is low while one set is being computed or waits
        for the current vector to end.
    i_stream : In(stream.Signature(AccBeat(acc_width)))
        ``{acc, last}``. ``i_stream.ready`` is low until the vector's factor is ready, and
        while the output stalls (``ready = factor_ready & (~o_stream.valid | o_stream.ready)``).
    o_stream : Out(stream.Signature(RescaleBeat()))
        ``{y, last}``: ``y = sat16(rshift_round(acc · S, z))``, one per input, in order.
        ``o_stream.ready`` may drop at any time; the element pipeline then stalls as a whole.
    s : Out(16), z : Out(Z_SHAPE)
        ``(S, z) = arith.rescale_factor(...)`` of the vector whose elements ``i_stream`` takes
        now (``z`` unclamped, as rescale_factor returns it); for observation and tests.

    Timing
    ------
    Elements: one per cycle, latency ``self.latency`` cycles (accepted -> output valid): 7 for
    acc_width <= 17, 8 above (one more stage for the hi·S partial product). The
    factor takes :func:`factor_cycles` (40 .. ``FACTOR_CYCLES_MAX`` = 87) cycles from the
    accepted parameter beat to the first cycle its vector's elements can be accepted. It runs
    while the previous vector streams: with each parameter beat sent as soon as it is taken
    and vectors longer than that, consecutive vectors are one idle cycle apart.

    Arithmetic
    ----------
    The factor is computed once per vector by a sequential shift-and-add multiplier (16 cycles
    per 16x16 product) and a one-bit-per-cycle normalizer for ``t1``, ``t2``, so it costs no
    SB_MAC16. It is then brought into a form that needs no left shifter per element:
    ``z <= 0`` means ``out = sat16(acc · S · 2**-z)``, and ``S_eff = min(S · 2**-z, 2**15)``
    gives the same result (for ``acc != 0`` both saturate once ``S · 2**-z >= 2**15``), so the
    element path computes ``sat16(acc · S_eff)`` without shifting or rounding. For ``z >= 1``
    it uses ``rshift_round(P, z) = ((P >> (z - 1)) + 1) >> 1`` (floor shifts), with the right
    shift clamped to ``acc_width + 15`` (which leaves only the sign either way); whether the
    result saturates is decided on the shifted value before the final ``+ 1``.

    The element product ``acc · S_eff`` runs on unsigned SB_MAC16-sized partial products:
    ``acc`` read as unsigned ``acc_u = acc + sign·2**acc_width`` splits into ``lo`` (16 bits) and
    ``hi`` (``acc_width - 16`` bits), and ``acc · S = lo·S + (hi·S << 16) - (sign·S <<
    acc_width)``. Up to 17 bits the part above ``lo`` is just the sign, so ``acc · S = lo·S -
    (sign·S << min(acc_width, 16))``: one SB_MAC16 and one subtract; wider accumulators use a
    second SB_MAC16 for ``hi·S`` and one more stage. Pipeline: MAC input registers, MAC output
    registers, [partial-product add,] sign correction, coarse and fine right shift,
    saturation decision, round and saturate (the output register).

    Resources (iCE40UP5K, ``hdl/synth.py``): acc_width 17: 1 SB_MAC16, about 570 LUT4 and 400
    FF (770 logic cells), 49 MHz; acc_width 24: 2 SB_MAC16, 640 LUT4, 490 FF (900 cells),
    50 MHz. No EBR.
    """

    def __init__(self, acc_width: int):
        if not isinstance(acc_width, int) or not ACC_WIDTH_MIN <= acc_width <= ACC_WIDTH_MAX:
            raise ValueError(f"Rescale acc_width must be an integer from {ACC_WIDTH_MIN} to "
                             f"{ACC_WIDTH_MAX} (the ternary core's accumulator width), not "
                             f"{acc_width!r}")
        self.acc_width = acc_width
        self.latency = 7 if acc_width <= 17 else 8
        super().__init__({
            "i_params": In(stream.Signature(RescaleParams())),
            "i_stream": In(stream.Signature(AccBeat(acc_width))),
            "o_stream": Out(stream.Signature(RescaleBeat())),
            "s": Out(unsigned(S_BITS)),
            "z": Out(Z_SHAPE),
        })

    def elaborate(self, platform):
        m = Module()
        w = self.acc_width
        p_bits, rs_max = rescale_widths(w)

        # ---- the factor, computed into the "next" register set -------------------------------
        # (S, z) of the next set are mul_lo and f_z: the unit takes no new parameters until the
        # set has moved to "current"
        nxt_full = Signal()
        nxt_seff = Signal(S_BITS)
        nxt_rs = Signal(range(rs_max + 1))
        nxt_exact = Signal()

        mul_a = Signal(MANT_BITS)          # multiplicand
        mul_hi = Signal(MANT_BITS)         # product = {mul_hi, mul_lo}; mul_lo starts as the
        mul_lo = Signal(MANT_BITS)         # multiplier and shifts out one bit per step
        step = Signal(range(MANT_BITS))
        t1, t2 = Signal(range(_P1_BITS - 15)), Signal(range(_P2_BITS - 15))
        mvn_zero = Signal()
        f_sh = Signal(signed(SH_BITS))
        f_e = Signal(E_BITS)
        f_gamma = Signal(MANT_BITS)
        f_scale_exp = Signal(signed(SCALE_EXP_BITS))
        f_z = Signal(Z_SHAPE)
        f_zc = Signal(range(Z_MIN, Z_MAX + 1))
        left = Signal(range(-Z_MIN + 1))   # left shifts still to apply to nxt_seff

        partial = Signal(MANT_BITS + 1)
        m.d.comb += partial.eq(mul_hi + Mux(mul_lo[0], mul_a, 0))
        multiply_step = [mul_hi.eq(partial[1:]), mul_lo.eq(Cat(mul_lo[1:], partial[0])),
                         step.eq(step + 1)]
        halve = [mul_hi.eq(mul_hi >> 1), mul_lo.eq(Cat(mul_lo[1:], mul_hi[0]))]

        pp = self.i_params.p
        with m.FSM(name="factor"):
            with m.State("IDLE"):
                m.d.comb += self.i_params.ready.eq(~nxt_full)
                with m.If(self.i_params.valid & ~nxt_full):
                    m.d.sync += [
                        mul_a.eq(pp.mvn), mul_lo.eq(pp.mant), mul_hi.eq(0), step.eq(0),
                        t1.eq(0), t2.eq(0), mvn_zero.eq(pp.mvn == 0), f_sh.eq(pp.sh),
                        f_e.eq(pp.e), f_gamma.eq(pp.gamma_mant), f_scale_exp.eq(pp.scale_exp),
                    ]
                    m.next = "P1"
            with m.State("P1"):                    # p1 = mvn · mant
                m.d.sync += multiply_step
                with m.If(step == MANT_BITS - 1):
                    m.next = "TOP1"
            with m.State("TOP1"):                  # p1' = p1 >> t1, 16 bits
                with m.If(mul_hi != 0):
                    m.d.sync += halve + [t1.eq(t1 + 1)]
                with m.Else():
                    m.d.sync += [mul_a.eq(mul_lo), mul_lo.eq(f_gamma), mul_hi.eq(0), step.eq(0)]
                    m.next = "P2"
            with m.State("P2"):                    # p2 = p1' · gamma_mant
                m.d.sync += multiply_step
                with m.If(step == MANT_BITS - 1):
                    m.next = "TOP2"
            with m.State("TOP2"):                  # S = p2 >> t2, 16 bits
                with m.If(mul_hi != 0):
                    m.d.sync += halve + [t2.eq(t2 + 1)]
                with m.Else():
                    m.next = "Z"
            with m.State("Z"):
                # rescale_factor gives (0, 0) for mvn = 0; S = mul_lo is 0 then already
                m.d.sync += f_z.eq(Mux(mvn_zero, 0, f_e + f_scale_exp - f_sh - t1 - t2))
                m.next = "CLAMP"
            with m.State("CLAMP"):
                m.d.sync += f_zc.eq(Mux(f_z < Z_MIN, Z_MIN, Mux(f_z > Z_MAX, Z_MAX, f_z)))
                m.next = "SPLIT"
            with m.State("SPLIT"):
                m.d.sync += nxt_seff.eq(mul_lo)
                with m.If(f_zc <= 0):
                    m.d.sync += [nxt_exact.eq(1), nxt_rs.eq(0), left.eq(-f_zc)]
                with m.Else():
                    m.d.sync += [nxt_exact.eq(0), left.eq(0),
                                 nxt_rs.eq(Mux(f_zc - 1 > rs_max, rs_max, f_zc - 1))]
                m.next = "SHIFT_S"
            with m.State("SHIFT_S"):               # S_eff = min(S · 2**-z, 2**15) for z < 0
                with m.If(left != 0):
                    m.d.sync += [left.eq(left - 1),
                                 nxt_seff.eq(Mux(nxt_seff >= _SAT_S >> 1, _SAT_S, nxt_seff << 1))]
                with m.Else():
                    m.d.sync += nxt_full.eq(1)
                    m.next = "IDLE"

        # ---- the "current" register set, used by the elements of the vector in progress -------
        cur_full = Signal()
        cur_s, cur_seff = Signal(S_BITS), Signal(S_BITS)
        cur_z = Signal(Z_SHAPE)
        cur_rs = Signal(range(rs_max + 1))
        cur_exact = Signal()
        m.d.comb += [self.s.eq(cur_s), self.z.eq(cur_z)]

        en = Signal()                              # the whole element pipeline advances
        accept = Signal()
        m.d.comb += [
            en.eq(~self.o_stream.valid | self.o_stream.ready),
            self.i_stream.ready.eq(cur_full & en),
            accept.eq(self.i_stream.valid & self.i_stream.ready),
        ]
        with m.If(accept & self.i_stream.p.last):
            m.d.sync += cur_full.eq(0)
        with m.If(~cur_full & nxt_full):
            m.d.sync += [cur_full.eq(1), nxt_full.eq(0), cur_s.eq(mul_lo), cur_seff.eq(nxt_seff),
                         cur_z.eq(f_z), cur_rs.eq(nxt_rs), cur_exact.eq(nxt_exact)]

        # ---- element pipeline --------------------------------------------------------------
        # Every stage advances when ``en``; valid, last, exact and rs travel with the element.
        lo_bits, hi_bits = min(w, 16), max(w - 16, 0)
        acc = self.i_stream.p.acc
        ctl = {"valid": accept, "last": self.i_stream.p.last, "exact": cur_exact, "rs": cur_rs}

        def register(name, value, shape=None, reset_less=False):
            reg = Signal(shape if shape is not None else value.shape(), name=name,
                         reset_less=reset_less)
            with m.If(en):
                m.d.sync += reg.eq(value)
            return reg

        def advance(ctl, k):
            return {name: register(f"{name}{k}", value) for name, value in ctl.items()}

        # MAC input registers; acc = lo + (hi << 16) - (sign << acc_width), lo/hi unsigned
        ctl = advance(ctl, 1)
        lo = register("lo1", acc.as_unsigned()[:lo_bits], reset_less=True)
        s_mac = register("s1", cur_seff, reset_less=True)
        sign = register("sign1", acc[-1])
        if hi_bits > 1:
            hi = register("hi1", acc.as_unsigned()[16:], reset_less=True)
        # MAC output registers
        ctl = advance(ctl, 2)
        plo = register("plo2", lo * s_mac, unsigned(lo_bits + S_BITS), reset_less=True)
        corr = register("corr2", Mux(sign, s_mac, 0))
        if hi_bits > 1:
            phi = register("phi2", hi * s_mac, unsigned(hi_bits + S_BITS), reset_less=True)
            # acc_u · S, then the sign correction (two carry chains, two stages)
            ctl = advance(ctl, 3)
            u = register("u3", Cat(plo[:16], plo[16:] + phi), unsigned(w + S_BITS))
            corr = register("corr3", corr)
            ctl = advance(ctl, 4)
            prod = register("p4", Cat(u[:w], u[w:] - corr), signed(p_bits))
        else:
            # acc_width <= 17: the part above lo is the sign alone (hi = sign for 17), so
            # acc · S = lo·S - sign·S·2**lo_bits
            ctl = advance(ctl, 3)
            prod = register("p3", Cat(plo[:lo_bits], plo[lo_bits:] - corr), signed(p_bits))
        # floor right shift by rs: coarse (multiples of 8), then fine
        coarse = register("coarse", prod >> Cat(C(0, 3), ctl["rs"][3:]))
        ctl = advance(ctl, "c")
        t = register("t", coarse >> ctl["rs"][:3])
        ctl = advance(ctl, "t")
        # Rounding (z >= 1) is ((t + 1) >> 1): it saturates int16 for t >= 2**16 - 1 and
        # t <= -2**16 - 2; without rounding (z <= 0) outside [-2**15, 2**15). Deciding that on
        # t here (bit tests, no carry chains) leaves the +1 and a mux to the output stage.
        o_max, o_min = (1 << (OUT_BITS - 1)) - 1, -(1 << (OUT_BITS - 1))
        neg, exact = t[-1], ctl["exact"]
        sat_hi = register("sat_hi", ~neg & Mux(exact, t[OUT_BITS - 1:].any(),
                                                t[OUT_BITS:].any() | t[:OUT_BITS].all()))
        minus_65537 = t[OUT_BITS + 1:].all() & ~t[OUT_BITS] & t[:OUT_BITS].all()
        sat_lo = register("sat_lo", neg & Mux(exact, ~t[OUT_BITS - 1:].all(),
                                               ~t[OUT_BITS:].all() & ~minus_65537))
        t_low = register("t_low", t[:_T_BITS], signed(_T_BITS))
        ctl = advance(ctl, "s")
        # round and saturate: the output register
        y = Mux(ctl["exact"], t_low, (t_low + 1) >> 1)
        with m.If(en):
            m.d.sync += [
                self.o_stream.valid.eq(ctl["valid"]), self.o_stream.p.last.eq(ctl["last"]),
                self.o_stream.p.y.eq(Mux(sat_hi, o_max, Mux(sat_lo, o_min, y))),
            ]
        return m
