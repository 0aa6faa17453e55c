"""Sigmoid and SiLU (``arith.sigmoid_q``, ``arith.silu_q``) and the GLU (``arith.glu``).

:class:`SigmoidPipe` is the shared datapath: a fixed-latency pipeline with a clock enable, to
be embedded in other units (the MLGRU state unit, :class:`GLU`). :class:`SigmoidSiLU` wraps it
into a stream component. :func:`add_output_skid` is the output stage all these units use, so
that no ``ready`` depends combinationally on a downstream ``ready``.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree.models.arith import ONE_Q15, PRE_FRAC, SIG_LUT_SIZE, SIG_STEP_BITS, sigmoid_lut

__all__ = ["SigmoidPipe", "SigmoidSiLU", "SigmoidSiLUInput", "SigmoidSiLUOutput", "GLU",
           "GLUInput", "GLUOutput", "add_output_skid", "clamp_half_round", "HALF_Q15"]

HALF_Q15 = ONE_Q15 // 2                      # σ(0) = 0.5: the pipeline works on σ - 0.5
_IDX_BITS = (SIG_LUT_SIZE - 1).bit_length()  # 8: table index k
_SAT_BITS = _IDX_BITS + SIG_STEP_BITS        # 14: |x| saturates at 2**14 - 1 (16.0)
_LUT = [int(v) for v in sigmoid_lut()]
_DIFF = [_LUT[min(k + 1, SIG_LUT_SIZE - 1)] - _LUT[k] for k in range(SIG_LUT_SIZE)]
_DIFF_BITS = max(_DIFF).bit_length()         # 10: LUT[k+1] - LUT[k] <= 512


def add_output_skid(m: Module, o_stream, push, payload) -> Signal:
    """Output register plus one skid register in front of ``o_stream``; returns ``en``.

    ``en`` is a register (high while the skid register is empty): the pipeline feeding the
    output advances only in cycles with ``en`` and may ``push`` (one payload) only in such
    cycles. ``o_stream.valid``/``payload`` are registers; ``o_stream.ready`` may drop at any time
    and reaches only these two registers, so it never forms a combinational path upstream.
    """
    skid_valid = Signal(name="skid_valid")
    skid = Signal.like(o_stream.payload, reset_less=True, name="skid")
    out_free = ~o_stream.valid | o_stream.ready
    with m.If(out_free):
        with m.If(skid_valid):          # en was low: nothing is pushed this cycle
            m.d.sync += [o_stream.payload.eq(skid), skid_valid.eq(0)]
        with m.Else():
            m.d.sync += o_stream.valid.eq(push)
            with m.If(push):
                m.d.sync += o_stream.payload.eq(payload)
    with m.Elif(push):
        m.d.sync += [skid.eq(payload), skid_valid.eq(1)]
    en = Signal(name="pipe_en")
    m.d.comb += en.eq(~skid_valid)
    return en


def clamp_half_round(q):
    """The 17-bit value ``c`` with ``(c + 1) >> 1 == sat16((q + 1) >> 1)`` for a signed ``q``:
    ``q`` clamped to [-2**16, 2**16 - 2] by a test of its top bits (no carry chain). Register
    it, then add: the last step of ``sat16(rshift_round(v, s)) = sat16(((v >> (s-1)) + 1) >> 1)``.
    """
    top = q[16:]
    in_range = ((top == 0) & (q[:16] != 0xFFFF)) | (top == (1 << len(top)) - 1)
    return Mux(in_range, q[:17].as_signed(),
               Mux(q[-1], Const(-(1 << 16), signed(17)), Const((1 << 16) - 2, signed(17))))


class SigmoidPipe(wiring.Component):
    """σ(x) and silu(x) of int16 ``x`` (PRE_FRAC fractional bits), one input per cycle.

    Bit-exact with ``arith.sigmoid_q`` and ``arith.silu_q`` (docs/arithmetic.md, "Sigmoid and
    SiLU"). For embedding in other units: no handshake, a clock enable and valid bits.

    Parameters
    ----------
    tag_width : int
        Width of ``i_tag``/``o_tag``, a value carried alongside ``x`` (0: none).

    Ports
    -----
    en : In(1), default 1
        Clock enable: every register (and the ROM read) advances only in cycles with ``en``.
        Latencies below count such cycles; with ``en`` low the outputs hold.
    i_valid, i_x (signed 16), i_tag : In
        Input, sampled in every cycle with ``en``.
    sigma_valid, sigma (unsigned 16, Q1.15 in [0, 32768]), sigma_m (signed 16, ``sigma - 2**14``,
    in [-16384, 16384]) : Out
        ``SIGMA_LATENCY`` (4) enabled cycles after ``i_x``: with ``en`` high, an input presented
        in cycle C is here during cycle C+4. ``sigma_m`` is the form other units multiply with:
        it fits a signed 16-bit multiplier operand, ``sigma`` (up to 2**15) does not.
    silu_valid, silu (signed 16, PRE_FRAC), o_tag : Out
        ``SILU_LATENCY`` (6) enabled cycles after ``i_x`` (during cycle C+6).

    Datapath (cycle n: the work between the registers of cycles C+n and C+n+1)
    ---------------------------------------------------------------------------
    0. ``a = min(|x|, 2**14 - 1)``; ``k = a >> 6`` addresses the ROM, ``r = a & 63`` (for
       x < 0 from the one's complement ``~x``, with the weight ``r`` in 1..64, and saturation
       through entry 255, whose difference is 0: one LUT level in front of the ROM address).
       The ROM holds 256 words {``LUT[k]``,
       ``LUT[min(k+1, 255)] - LUT[k]``} of ``arith.sigmoid_lut()`` (26 bits: two EBRs) behind a
       synchronous read port.
    1. ``diff·r`` as three 2-term partial sums (shift-adds in LUTs: the SB_MAC16s are kept for
       16x16 multiplies); ``LUT[k]`` mirrored for x < 0 and offset by -2**14.
    2. ``t = (diff·r + 32) >> 6``.
    3. ``sigma_m = LUT[k] + t - 2**14`` for x >= 0, ``2**14 - LUT[k] - t`` for x < 0 (the
       sign mirror ``2**15 - p`` in the offset form).
    4. ``x · sigma_m``: a 16x16 signed multiply with registered operands and product (SB_MAC16).
    5. ``silu = ((x·sigma_m >> 14) + x + 1) >> 1``, which equals ``rshift_round(x · sigma, 15)``
       because ``x·sigma = x·sigma_m + 2**14·x``.
    """

    SIGMA_LATENCY = 4
    SILU_LATENCY = 6

    def __init__(self, tag_width: int = 0):
        if tag_width < 0:
            raise ValueError(f"tag_width must be 0 or more bits, not {tag_width}; use 0 for no tag")
        self.tag_width = tag_width
        super().__init__({
            "en": In(1, init=1),
            "i_valid": In(1),
            "i_x": In(signed(16)),
            "i_tag": In(unsigned(tag_width)),
            "sigma_valid": Out(1),
            "sigma": Out(unsigned(16)),
            "sigma_m": Out(signed(16)),
            "silu_valid": Out(1),
            "silu": Out(signed(16)),
            "o_tag": Out(unsigned(tag_width)),
        })

    def elaborate(self, platform):
        m = Module()
        en = self.en
        n_sig, n_silu = self.SIGMA_LATENCY, self.SILU_LATENCY

        rom = Memory(shape=unsigned(16 + _DIFF_BITS), depth=SIG_LUT_SIZE,
                     init=[lo | (d << 16) for lo, d in zip(_LUT, _DIFF)])
        m.submodules.rom = rom
        rom_rd = rom.read_port(domain="sync")
        m.d.comb += rom_rd.en.eq(en)

        def reg(shape, name):       # datapath registers: no reset, so they fold into SB_MAC16s
            return Signal(shape, name=name, reset_less=True)

        # Register k of a chain holds the element presented in cycle C during cycle C + 1 + k.
        valid = [Signal(name=f"valid{k}") for k in range(n_silu)]
        tag = [reg(self.tag_width, f"tag{k}") for k in range(n_silu)]
        x = [reg(signed(16), f"x{k}") for k in range(n_silu - 1)]
        neg = [reg(1, f"neg{k}") for k in range(n_sig - 1)]
        with m.If(en):
            m.d.sync += [valid[0].eq(self.i_valid), tag[0].eq(self.i_tag), x[0].eq(self.i_x),
                         neg[0].eq(self.i_x[15])]
            for chain in (valid, tag, x, neg):
                m.d.sync += [chain[k].eq(chain[k - 1]) for k in range(1, len(chain))]

        # cycle 0: table index and interpolation weight of |x|, one LUT level deep. For x < 0,
        # |x| = y + 1 with y = ~x: index y >> 6 with weight (y & 63) + 1 in 1..64 interpolates
        # to the same value as (y + 1) >> 6 with (y + 1) & 63 (weight 64 reaches the next entry
        # exactly); the + 1 is added in cycle 1. |x| >= 2**14 saturates: those inputs address
        # entry 255, whose difference LUT[255] - LUT[255] is 0, so any weight gives LUT[255]
        # (and y = 2**14 - 1, x = -2**14, reaches it with weight 64).
        neg_x = self.i_x[15]
        y = Signal(unsigned(15))
        m.d.comb += y.eq(self.i_x[:15] ^ neg_x.replicate(15))
        m.d.comb += rom_rd.addr.eq(y[SIG_STEP_BITS:_SAT_BITS] | y[_SAT_BITS].replicate(_IDX_BITS))
        r1 = reg(unsigned(SIG_STEP_BITS), "r1")          # weight - neg
        with m.If(en):
            m.d.sync += r1.eq(y[:SIG_STEP_BITS])

        # cycle 1: ROM data; diff·r as three 2-term partial sums (each one carry chain, so the
        # slow EBR output sees a short path); lo mirrored for x < 0, minus 2**14
        lo = rom_rd.data[:16]
        diff = rom_rd.data[16:]

        def gated(bit, shift):
            return Mux(r1[bit], diff << shift, 0)

        # diff · (r[0] + neg) in {0, diff, 2·diff}: one LUT level, like the other terms
        low = Mux(r1[0] & neg[0], diff << 1, Mux(r1[0] | neg[0], diff, 0))
        pp = [reg(unsigned(_DIFF_BITS + 2), f"pp{k}_2") for k in range(3)]
        lo_m = reg(signed(17), "lo_m2")
        with m.If(en):
            m.d.sync += [
                pp[0].eq(low + gated(1, 1)),                    # diff · (r[0:2] + neg)
                pp[1].eq(gated(2, 0) + gated(3, 1)),            # diff · r[2:4]
                pp[2].eq(gated(4, 0) + gated(5, 1)),            # diff · r[4:6]
                lo_m.eq(Mux(neg[0], HALF_Q15 - lo, lo - HALF_Q15)),
            ]

        # cycle 2: t = rshift_round(diff·r, 6)
        t = reg(unsigned(_DIFF_BITS), "t3")
        lo_m3 = reg(signed(17), "lo_m3")
        rounding = 1 << (SIG_STEP_BITS - 1)
        with m.If(en):
            m.d.sync += [t.eq((pp[0] + (pp[1] << 2) + (pp[2] << 4) + rounding) >> SIG_STEP_BITS),
                         lo_m3.eq(lo_m)]

        # cycle 3: sigma - 2**14, where sigma = p = LUT[k] + t for x >= 0 and 2**15 - p for x < 0
        sigma_m = reg(signed(16), "sigma_m4")
        with m.If(en):
            # lo_m3 - t = lo_m3 + ~t + 1: one adder with a conditional inversion and carry-in
            m.d.sync += sigma_m.eq(lo_m3 + (Cat(t, 0) ^ neg[2].replicate(len(t) + 1)).as_signed()
                                   + neg[2])

        # cycle 4: x · sigma_m, a registered 16x16 signed multiply (SB_MAC16)
        prod = reg(signed(32), "prod5")
        with m.If(en):
            m.d.sync += prod.eq(x[3] * sigma_m)

        # cycle 5: silu = rshift_round(x · (sigma_m + 2**14), 15)
        #              = floor((floor(x·sigma_m / 2**14) + x + 1) / 2)
        silu = reg(signed(16), "silu6")
        with m.If(en):
            m.d.sync += silu.eq(((prod >> 14) + x[4] + 1) >> 1)

        m.d.comb += [
            self.sigma_valid.eq(valid[n_sig - 1]),
            self.sigma_m.eq(sigma_m),
            self.sigma.eq(sigma_m + HALF_Q15),
            self.silu_valid.eq(valid[n_silu - 1]),
            self.silu.eq(silu),
            self.o_tag.eq(tag[n_silu - 1]),
        ]
        return m


class SigmoidSiLUInput(data.StructLayout):
    def __init__(self):
        super().__init__({"x": signed(16), "last": 1})


class SigmoidSiLUOutput(data.StructLayout):
    def __init__(self):
        super().__init__({"sigma": unsigned(16), "silu": signed(16), "last": 1})


class SigmoidSiLU(wiring.Component):
    """Stream form of :class:`SigmoidPipe`: ``{x, last}`` in, ``{sigma, silu, last}`` out.

    ``sigma = arith.sigmoid_q(x)`` (Q1.15, 0..32768), ``silu = arith.silu_q(x)`` (int16, the
    format of x); ``last`` is passed through.

    Throughput one element per cycle. Latency: ``o_stream.valid`` rises ``LATENCY`` (7) cycles
    after the cycle in which the input transfers (without back-pressure). ``i_stream.ready`` is a
    register (high unless the output skid register is full); ``o_stream.ready`` may drop at any
    time, and then the pipeline stalls as a whole, losing nothing.
    """

    LATENCY = SigmoidPipe.SILU_LATENCY + 1

    i_stream: In(stream.Signature(SigmoidSiLUInput()))
    o_stream: Out(stream.Signature(SigmoidSiLUOutput()))

    def elaborate(self, platform):
        m = Module()
        m.submodules.pipe = pipe = SigmoidPipe(tag_width=1)
        push = Signal()
        # sigma is ready two stages before silu: delay it to line up
        assert SigmoidPipe.SILU_LATENCY - SigmoidPipe.SIGMA_LATENCY == 2
        sigma_d = [Signal(unsigned(16), reset_less=True, name=f"sigma_d{k}") for k in range(2)]
        en = add_output_skid(m, self.o_stream, push, Cat(sigma_d[1], pipe.silu, pipe.o_tag[0]))
        with m.If(en):
            m.d.sync += [sigma_d[0].eq(pipe.sigma), sigma_d[1].eq(sigma_d[0])]
        m.d.comb += [
            pipe.en.eq(en),
            pipe.i_valid.eq(self.i_stream.valid),
            pipe.i_x.eq(self.i_stream.p.x),
            pipe.i_tag.eq(self.i_stream.p.last),
            self.i_stream.ready.eq(en),
            push.eq(en & pipe.silu_valid),
        ]
        return m


class GLUInput(data.StructLayout):
    """``gate``, ``up`` (int16, PRE_FRAC), ``u_frac`` (the format of u, 0..15), ``last``."""

    def __init__(self):
        super().__init__({"gate": signed(16), "up": signed(16), "u_frac": unsigned(4), "last": 1})


class GLUOutput(data.StructLayout):
    def __init__(self):
        super().__init__({"u": signed(16), "last": 1})


# u = sat16(rshift_round(P, s)), P = silu(gate)·up, s = 2·PRE_FRAC - u_frac in 5..20:
# ((P >> (s - 1)) + 1) >> 1 with P >> (s - 1) = (P >> _GLU_PRESHIFT) >> (15 - u_frac)
_GLU_PRESHIFT = 2 * PRE_FRAC - 1 - 15


class GLU(wiring.Component):
    """The GLU channel mixer's element-wise part: ``u = arith.glu(gate, up, u_frac)``.

    ``u = sat16(rshift_round(silu(gate) · up, 2·PRE_FRAC - u_frac))``: int16 in (gate, up with
    PRE_FRAC fractional bits), int16 out (``u_frac`` fractional bits, a per-layer value every
    element carries); ``last`` is passed through.

    Ports: ``i_stream`` {gate, up, u_frac, last}, ``o_stream`` {u, last}.

    Throughput one element per cycle. Latency: ``o_stream.valid`` rises ``LATENCY`` (10) cycles
    after the cycle in which the input transfers (without back-pressure): the
    :class:`SigmoidPipe` (6, carrying ``up`` and the shift as its tag), the 16x16 product
    silu·up (1, an SB_MAC16 with registered operands and product), the variable shift (1), the
    clamp (1), the rounding add into the output register (1).
    ``i_stream.ready`` is a register (high unless the output skid register is full);
    ``o_stream.ready`` may drop at any time, and then the pipeline stalls as a whole.
    Resources: the sigmoid ROM (two EBRs), two 16x16 multipliers.
    """

    LATENCY = SigmoidPipe.SILU_LATENCY + 4

    i_stream: In(stream.Signature(GLUInput()))
    o_stream: Out(stream.Signature(GLUOutput()))

    def elaborate(self, platform):
        m = Module()
        m.submodules.pipe = pipe = SigmoidPipe(tag_width=21)
        up = pipe.o_tag[:16].as_signed()
        prod = Signal(signed(32), reset_less=True)           # SB_MAC16 output register
        q = Signal(signed(32 - _GLU_PRESHIFT), reset_less=True)
        q_clamped = Signal(signed(17), reset_less=True)
        valid = Signal(3)
        last = Signal(3, reset_less=True)
        k = Signal(4, reset_less=True)                       # 15 - u_frac
        push = Signal()
        en = add_output_skid(m, self.o_stream, push, Cat(((q_clamped + 1) >> 1)[:16], last[2]))
        with m.If(en):
            m.d.sync += [prod.eq(pipe.silu * up),
                         q.eq((prod >> _GLU_PRESHIFT) >> k),
                         q_clamped.eq(clamp_half_round(q)),
                         k.eq(pipe.o_tag[17:21]),
                         valid.eq(Cat(pipe.silu_valid, valid[:2])),
                         last.eq(Cat(pipe.o_tag[16], last[:2]))]
        m.d.comb += [
            pipe.en.eq(en),
            pipe.i_valid.eq(self.i_stream.valid),
            pipe.i_x.eq(self.i_stream.p.gate),
            pipe.i_tag.eq(Cat(self.i_stream.p.up, self.i_stream.p.last,
                              15 - self.i_stream.p.u_frac)),
            self.i_stream.ready.eq(en),
            push.eq(en & valid[2]),
        ]
        return m
