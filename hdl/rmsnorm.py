"""The RMSNorm unit: statistics ``arith.norm_stats`` (with the integer reciprocal square root
``arith.irsqrt``) and the weight multiply of ``arith.rmsnorm``, bit for bit.

Four components; the first three work alone:

* :class:`IRSqrt`: ``u -> (mant, e) = arith.irsqrt(u)``, standalone (NormStats has its own).
* :class:`NormStats`: a streamed vector ``x`` -> ``arith.norm_stats(x, eps_q)``. BitLinear uses
  only this part.
* :class:`NormApply`: ``(x_j, w_j)`` -> ``sat16(rshift_round(x_j · w_j · mant, shift))``, one
  element per cycle.
* :class:`RMSNorm`: both joined; the vector is streamed twice (statistics, then apply).
"""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.hdl.primitives import SeqDivider
from mmfree.models.arith import IRSQRT_NORM_BITS

__all__ = ["IRSqrt", "NormStats", "NormApply", "RMSNorm", "StatsResult", "StatsBeat",
           "ApplyBeat", "NormBeat", "norm_steps", "irsqrt_latency", "stats_latency",
           "stats_widths", "MAX_N_LIMIT", "EPS_BITS", "SHIFT_BITS"]

X_BITS = 16                       # vectors and weights are int16 (docs/arithmetic.md)
MANT_BITS = 16                    # irsqrt mantissa: [2**15, 2**16)
E_BITS = 6                        # irsqrt exponent: [16, 46]
EPS_BITS = 32                     # eps_q port width
SHIFT_BITS = 6                    # NormApply shift port: 0..63
U_MAX_BITS = 62                   # irsqrt's domain is [1, 2**62)
SQRT_BITS = IRSQRT_NORM_BITS // 2   # q = isqrt(un) has 15 bits
MAX_N_LIMIT = 1 << 20             # the longest vector a NormStats may be built for
_SQ_BITS = 2 * (X_BITS - 1) + 1   # x² <= 2**30: 31 bits unsigned
_U_WIDTH = max(_SQ_BITS, EPS_BITS) + 1   # u = ms + eps_q, ms <= 2**30: 33 bits

# The normalizer moves u by 8 or 2 bits per cycle towards [2**28, 2**30); these are the bounds
# (for IRSQRT_NORM_BITS = 30) below/above which a whole byte can go at once.
_LO = IRSQRT_NORM_BITS - 2        # un < 2**28: shift left
_HI = IRSQRT_NORM_BITS            # un >= 2**30: shift right

# NormStats's square root reads u (< 2**33) from bit 33 down, two bits a digit: 17 pairs, up to
# 16 of them leading zeros, then 15 digits more than the first one: 31 digit steps at most;
# e = 30 - s = 15 + (number of nonzero pairs) = 47 - (digit steps up to D[14] set).
_U_TOP = 33
_SQRT_DIGITS = (_U_TOP + 1) // 2 - 1 + SQRT_BITS
_E_START = IRSQRT_NORM_BITS + (_U_TOP + 1) // 2


def norm_steps(u_width: int) -> int:
    """Cycles the normalizer of :class:`IRSqrt` needs for any u of ``u_width`` bits.

    irsqrt shifts u by ``2s`` bits, ``s = (30 - bitlen(u)) // 2``; a cycle moves by 8 bits
    (``|s|`` down by 4) while at least a byte's worth is left, else by 2 bits, so ``|s|``
    takes ``|s| // 4 + |s| % 4`` cycles. The worst case over bitlen 1..u_width: 5 for
    u_width <= 58 (s = 14 or 11 for bitlen 1 or 7), 6 for u_width 59..62 (s = -15).
    """
    return max(abs(s) // 4 + abs(s) % 4
               for s in ((IRSQRT_NORM_BITS - b) // 2 for b in range(1, u_width + 1)))


def irsqrt_latency(u_width: int) -> int:
    """:attr:`IRSqrt.latency`: normalize, 15 square-root digits, hand q to the divider, 30
    quotient bits, result register."""
    return norm_steps(u_width) + SQRT_BITS + 1 + IRSQRT_NORM_BITS + 1


def stats_widths(max_n: int) -> tuple[int, int]:
    """``(ss_width, n_width)`` of :class:`NormStats`: ``ss = sum(x²) <= max_n · 2**30`` (equal
    for an all -32768 vector, so ``bitlen(max_n · 2**30)`` bits: 43 for 4096) and the element
    count ``n <= max_n`` (``bitlen(max_n)`` bits)."""
    return (max_n << (2 * (X_BITS - 1))).bit_length(), max_n.bit_length()


def _check_max_n(max_n) -> None:
    if not isinstance(max_n, int) or not 1 <= max_n <= MAX_N_LIMIT:
        raise ValueError(f"max_n must be an integer in 1..{MAX_N_LIMIT} (the longest vector "
                         f"the unit will see), not {max_n!r}")


def _stats_u_bits(ss_width: int) -> int:
    """Bits of :class:`NormStats`'s shift register: ss, and u = ms + eps_q (< 2**33) read
    from bit 33 down in pairs."""
    return max(ss_width, _U_TOP + 1)


def stats_latency(max_n: int) -> int:
    """:attr:`NormStats.latency` = ``max(ss_width, 34) + 84``: 3 cycles to finish the sum,
    ``W + 2`` for ``ss // n`` (W = max(ss_width, 34)), 1 for ``u = ms + eps_q``, 62 for the
    square root, 16 for the reciprocal (the result register is valid right after)."""
    _check_max_n(max_n)
    return 3 + _stats_u_bits(stats_widths(max_n)[0]) + 2 + 1 + 2 * _SQRT_DIGITS + MANT_BITS


class StatsResult(data.StructLayout):
    """``1/sqrt(u) ≈ mant · 2**-e``: ``mant`` in [2**15, 2**16), ``e`` in [16, 46]."""

    def __init__(self):
        super().__init__({"mant": unsigned(MANT_BITS), "e": unsigned(E_BITS)})


class StatsBeat(data.StructLayout):
    """One element of a vector for the statistics: ``x`` (int16), ``last`` on its final element."""

    def __init__(self):
        super().__init__({"x": signed(X_BITS), "last": 1})


class ApplyBeat(data.StructLayout):
    """One element for the weight multiply: ``x`` (int16) and its norm weight ``w`` (int16)."""

    def __init__(self):
        super().__init__({"x": signed(X_BITS), "w": signed(X_BITS)})


class NormBeat(data.StructLayout):
    """One element of :class:`RMSNorm`'s apply pass: ``x``, ``w``, ``last``."""

    def __init__(self):
        super().__init__({"x": signed(X_BITS), "w": signed(X_BITS), "last": 1})


class IRSqrt(wiring.Component):
    """Integer reciprocal square root, ``(mant, e) = arith.irsqrt(u)``, one value at a time.

    Parameters
    ----------
    u_width : int
        Bits of the input, 1..62 (irsqrt's domain is [1, 2**62)). (:class:`NormStats` does not
        use this unit: it computes irsqrt on its own shared shift-subtract datapath.)

    Ports
    -----
    i_stream : In(stream.Signature(unsigned(u_width)))
        ``u`` >= 1. ``u = 0`` is outside the contract; the unit still answers (mant 0xFFFF)
        and never hangs.
    o_stream : Out(stream.Signature(StatsResult()))
        ``{mant, e}``: 16-bit mantissa in [2**15, 2**16), exponent in [16, 46].

    Algorithm (docs/arithmetic.md, "Integer reciprocal square root")
    ---------
    1. Normalize: ``norm_steps(u_width)`` cycles (5 for u_width <= 58, else 6). Each cycle
       shifts ``un`` by 8 bits if ``un < 2**22`` (left) or ``un >= 2**36`` (right), else by 2
       bits if ``un < 2**28`` or ``un >= 2**30``, else holds; ``e`` starts at 30 and moves by
       the shift / 2. Four 2-bit shifts in a row would be taken in exactly those cases, and
       truncating right shifts compose, so this is irsqrt's single even shift (``un = u << 2s``
       or ``u >> -2s``) in a fixed number of cycles, without a priority encoder and barrel
       shifter.
    2. ``q = isqrt(un)``: 15 cycles of the digit-by-digit non-restoring square root, two bits
       of ``un`` per cycle, one 17-bit add or subtract chosen by the remainder's sign.
    3. ``mant = (2**30 - 1) // q`` on :class:`SeqDivider` (30 / 15 bits, 30 cycles; q >= 2**14
       makes the quotient fit 16 bits).

    Latency and throughput
    ----------------------
    ``o_stream.valid`` rises ``latency = norm_steps(u_width) + 47`` cycles after the cycle in
    which ``u`` transfers (52 for u_width <= 58, 53 above); attribute ``latency``. One value
    at a time: ``i_stream.ready`` is high only while idle, i.e. from the cycle after the
    result transfers; it decodes the state register and depends on no input.
    ``o_stream.ready`` may drop at any time (the result is held).
    """

    def __init__(self, u_width: int = U_MAX_BITS):
        if not isinstance(u_width, int) or not 1 <= u_width <= U_MAX_BITS:
            raise ValueError(f"IRSqrt u_width must be an integer in 1..{U_MAX_BITS} (irsqrt's "
                             f"domain is [1, 2**62)), not {u_width!r}")
        self.u_width = u_width
        self.norm_steps = norm_steps(u_width)
        self.latency = irsqrt_latency(u_width)
        super().__init__({
            "i_stream": In(stream.Signature(unsigned(u_width))),
            "o_stream": Out(stream.Signature(StatsResult())),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.div = div = SeqDivider(IRSQRT_NORM_BITS, SQRT_BITS)

        un = Signal(max(self.u_width, IRSQRT_NORM_BITS), reset_less=True)
        e = Signal(E_BITS, reset_less=True)
        rem = Signal(signed(SQRT_BITS + 2), reset_less=True)   # |remainder| < 2**16
        root = Signal(SQRT_BITS, reset_less=True)
        count = Signal(range(max(self.norm_steps, SQRT_BITS) + 1), reset_less=True)

        # One digit of the non-restoring square root: bring down the next two bits of un, then
        # subtract 4·root + 1 if the remainder is >= 0, else add 4·root + 3; the new digit is
        # 1 when the result is >= 0. Modulo 2**17 (the remainder stays within ±2**16):
        # -(4·root + 1) = ~(4·root) = {~root, 11}, +(4·root + 3) = {root, 11}, so it is one
        # adder whose operand is root XOR the registered sign: no mux after the carry chain.
        rem_next = (Cat(un[_LO:_HI], rem[:-2])
                    + Cat(C(0b11, 2), root ^ ~rem[-1].replicate(SQRT_BITS)))[:len(rem)].as_signed()

        m.d.comb += [
            div.i_stream.p.dividend.eq((1 << IRSQRT_NORM_BITS) - 1),
            div.i_stream.p.divisor.eq(root),
            self.o_stream.p.mant.eq(div.o_stream.p.quotient[:MANT_BITS]),
            self.o_stream.p.e.eq(e),
        ]

        # Handshakes are plain functions of the state (continuous assignments in Verilog:
        # Icarus never evaluates an `always @*` block whose inputs keep their initial values,
        # which would leave a ready or valid at X after reset).
        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.i_stream.valid):
                    m.d.sync += [un.eq(self.i_stream.payload), e.eq(IRSQRT_NORM_BITS),
                                 count.eq(self.norm_steps - 1)]
                    m.next = "NORMALIZE"
            with m.State("NORMALIZE"):
                with m.If(un[_HI + 6:].any()):
                    m.d.sync += [un.eq(un >> 8), e.eq(e + 4)]
                with m.Elif(un[_HI:].any()):
                    m.d.sync += [un.eq(un >> 2), e.eq(e + 1)]
                with m.Elif(~un[_LO - 6:].any()):
                    m.d.sync += [un.eq(un << 8), e.eq(e - 4)]
                with m.Elif(~un[_LO:].any()):
                    m.d.sync += [un.eq(un << 2), e.eq(e - 1)]
                m.d.sync += count.eq(count - 1)
                with m.If(count == 0):
                    m.d.sync += [rem.eq(0), root.eq(0), count.eq(SQRT_BITS - 1)]
                    m.next = "SQRT"
            with m.State("SQRT"):
                m.d.sync += [un.eq(un << 2), count.eq(count - 1)]
                m.d.sync += [rem.eq(rem_next), root.eq(Cat(~rem_next[-1], root))]
                with m.If(count == 0):
                    m.next = "DIVIDE"
            with m.State("DIVIDE"):
                with m.If(div.i_stream.ready):                  # the divider is idle here
                    m.next = "RESULT"
            with m.State("RESULT"):
                with m.If(div.o_stream.valid & self.o_stream.ready):
                    m.next = "IDLE"
        in_result = fsm.ongoing("RESULT")
        m.d.comb += [
            self.i_stream.ready.eq(fsm.ongoing("IDLE")),
            div.i_stream.valid.eq(fsm.ongoing("DIVIDE")),
            self.o_stream.valid.eq(div.o_stream.valid & in_result),
            div.o_stream.ready.eq(self.o_stream.ready & in_result),
        ]
        return m


class NormStats(wiring.Component):
    """RMSNorm statistics of a streamed int16 vector: ``(mant, e) = arith.norm_stats(x, eps_q)``.

    Parameters
    ----------
    max_n : int
        The longest vector, 1..2**20. The length n of each vector is counted (``last`` marks
        its end), not configured. Widths (:func:`stats_widths`): sum of squares
        ``ss_width = bitlen(max_n · 2**30)`` bits (43 for 4096; equality ``ss = n · 2**30``
        happens for an all -32768 vector), count ``bitlen(max_n)`` bits. A vector longer than
        max_n is outside the contract (the count wraps).

    Ports
    -----
    i_stream : In(stream.Signature(StatsBeat()))
        ``{x, last}``, one element per transfer, up to one per cycle.
    eps_q : In(unsigned(32))
        ``eps_q >= 1`` (docs/arithmetic.md), sampled in the cycle the ``last`` element transfers.
    o_stream : Out(stream.Signature(StatsResult()))
        ``{mant, e}`` of the vector, once per vector.

    Datapath
    --------
    One shift register ``U`` (``W = max(ss_width, 34)`` bits), one remainder ``R``
    (``max(17, bitlen(max_n) + 2)`` bits), one divisor/root register ``D``
    (``max(bitlen(max_n), 15)`` bits) and one subtractor ``(2R + b) - S``; every phase after
    the sum is a restoring shift-subtract step on them:

    1. ``x`` register -> ``x·x`` register (both without reset: they fold into one SB_MAC16)
       -> ``U += x²`` (one carry chain), ``D += 1`` (D counts n).
    2. ``ms = (4·ss) // (4·n) = ss // n``: ``W + 2`` steps with ``S = 4·D``, dividend bits
       ``b`` from U's top (two zeros after ss), quotient bits shifted into U's bottom.
    3. ``U = ms + eps_q`` (one 33-bit add; ms <= 2**30), D and R cleared.
    4. ``q = isqrt(un)``: the digit-by-digit square root of u read from ``U[33]`` downwards,
       one bit per cycle (two cycles per digit: bring down the high bit, then the low bit and
       subtract ``S = 4·root + 1``), root digits shifted into D, for 62 cycles (31 digits).
       A digit step happens only while ``D[14]`` is clear: the leading zero digits of u are
       irsqrt's normalizing left shift and its right shift is the truncated low pairs, so
       ``q`` is exactly the 15 root digits from the first 1 (isqrt(u >> 2k) =
       isqrt(u) >> k). ``e`` starts at 47 and counts the digit steps down: ``e = 30 - s``.
    5. ``mant = (2**32 - 1) // (4q)`` (``= (2**30 - 1) // q``: no multiple of q lies in
       ``(2**30 - 1, 2**30 - 1/4]``): the first 16 quotient bits are 0 (``4q >= 2**16``), so
       R starts at ``2**16 - 1`` and 16 steps with ``b = 1``, ``S = 4·D`` shift the quotient
       into U's low 16 bits.

    Latency and throughput
    ----------------------
    ``o_stream.valid`` rises ``latency = max(ss_width, 34) + 84`` cycles after the cycle in
    which the ``last`` element transfers (attribute ``latency``, :func:`stats_latency`; 127
    for max_n = 4096, 118 for 1..8): 3 to finish the sum, ``W + 2`` for ``ss // n``, 1 for
    ``u``, 62 for the square root, 16 for the reciprocal.

    One vector at a time: ``i_stream.ready`` is high (whatever ``i_stream.valid`` and
    ``o_stream.ready`` do) except from the cycle after ``last`` transfers until the cycle after
    the result transfers, so a vector of n elements occupies the unit for at least
    ``n + latency + 1`` cycles. ``i_stream.ready`` is a register; ``o_stream.ready`` may drop
    at any time.
    """

    def __init__(self, max_n: int):
        self.latency = stats_latency(max_n)           # validates max_n
        self.max_n = max_n
        self.ss_width, self.n_width = stats_widths(max_n)
        self.u_width = _U_WIDTH
        super().__init__({
            "i_stream": In(stream.Signature(StatsBeat())),
            "eps_q": In(unsigned(EPS_BITS)),
            "o_stream": Out(stream.Signature(StatsResult())),
        })

    def elaborate(self, platform):
        m = Module()
        w = _stats_u_bits(self.ss_width)
        dw = max(self.n_width, SQRT_BITS)
        rw = dw + 2                                  # >= 17: the square root's remainder
        assert rw >= SQRT_BITS + 2

        x = Signal(signed(X_BITS), reset_less=True)      # multiplier operand register
        sq = Signal(_SQ_BITS, reset_less=True)           # multiplier product register
        x_valid, x_last = Signal(), Signal()
        sq_valid, sq_last = Signal(), Signal()
        closed = Signal()              # last taken, result not yet delivered
        eps = Signal(EPS_BITS, reset_less=True)
        u = Signal(w)                  # ss, then ms, u, then the quotient mant
        d = Signal(dw)                 # n, then the root q
        r = Signal(rw, reset_less=True)
        e = Signal(E_BITS, reset_less=True)
        count = Signal(range(max(w + 2, 2 * _SQRT_DIGITS, 2 * MANT_BITS)), reset_less=True)

        m.d.comb += self.i_stream.ready.eq(~closed)
        take = self.i_stream.valid & self.i_stream.ready
        m.d.sync += [x.eq(self.i_stream.p.x), x_valid.eq(take), x_last.eq(self.i_stream.p.last),
                     sq.eq((x * x)[:_SQ_BITS]), sq_valid.eq(x_valid), sq_last.eq(x_last)]
        with m.If(take & self.i_stream.p.last):
            m.d.sync += [closed.eq(1), eps.eq(self.eps_q)]

        # one restoring step: (2R + b) - S, S = 4·D (+1 in the square root)
        b = Signal()
        s_lsb = Signal()
        trial = Signal(rw + 2)
        m.d.comb += trial.eq(Cat(b, r) - Cat(s_lsb, C(0, 1), d))
        fits = ~trial[-1]
        r_step = Signal(rw)
        sub = Signal()                 # this cycle may subtract
        taken = fits & sub
        m.d.comb += r_step.eq(Mux(taken, trial[:rw], Cat(b, r)[:rw]))

        adding = Signal()              # the EPS state, as its own register (short path)
        total = u + Mux(adding, eps, sq)
        shifted = Cat(taken & ~s_lsb, u[:-1])   # the square root shifts zeros in

        with m.FSM():
            with m.State("SUM"):
                m.d.sync += r.eq(0)
                with m.If(sq_valid):
                    m.d.sync += [u.eq(total), d.eq(d + 1)]
                    with m.If(sq_last):
                        m.d.sync += count.eq(w + 1)
                        m.next = "MEAN"
            with m.State("MEAN"):                       # ms = (4 ss) // (4 n)
                m.d.comb += [b.eq(u[-1]), sub.eq(1)]
                m.d.sync += [u.eq(shifted), r.eq(r_step), count.eq(count - 1)]
                with m.If(count == 0):
                    m.d.sync += adding.eq(1)
                    m.next = "EPS"
            with m.State("EPS"):                        # u = ms + eps_q
                m.d.sync += [u.eq(total), adding.eq(0), r.eq(0), d.eq(0), e.eq(_E_START),
                             count.eq(2 * _SQRT_DIGITS - 1)]
                m.next = "SQRT"
            with m.State("SQRT"):                       # odd count: high bit; even: low bit
                digit = ~count[0] & ~d[SQRT_BITS - 1]
                m.d.comb += [b.eq(u[_U_TOP]), s_lsb.eq(1), sub.eq(digit)]
                m.d.sync += [u.eq(shifted), count.eq(count - 1)]
                with m.If(~d[SQRT_BITS - 1]):
                    m.d.sync += r.eq(r_step)
                with m.If(digit):
                    m.d.sync += [d.eq(Cat(fits, d[:-1])), e.eq(e - 1)]
                with m.If(count == 0):
                    m.d.sync += [r.eq((1 << MANT_BITS) - 1), count.eq(MANT_BITS - 1)]
                    m.next = "RECIP"
            with m.State("RECIP"):                      # mant = (2**32 - 1) // (4 q)
                m.d.comb += [b.eq(1), sub.eq(1)]
                m.d.sync += [u.eq(shifted), r.eq(r_step), count.eq(count - 1)]
                with m.If(count == 0):
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.o_stream.valid.eq(1)
                with m.If(self.o_stream.ready):
                    m.d.sync += [closed.eq(0), u.eq(0), d.eq(0)]
                    m.next = "SUM"
        m.d.comb += [self.o_stream.p.mant.eq(u[:MANT_BITS]), self.o_stream.p.e.eq(e)]
        return m


class NormApply(wiring.Component):
    """The weight multiply of RMSNorm: ``y = sat16(rshift_round(x · w · mant, shift))``, which
    is ``arith.rmsnorm`` for ``(mant, e) = norm_stats(x, eps_q)`` and
    ``shift = e + w_frac - out_frac``.

    Ports
    -----
    i_stream : In(stream.Signature(ApplyBeat()))
        ``{x, w}``: an element and its weight (int16 each), up to one per cycle.
    mant : In(unsigned(16))
        Any 16-bit value (irsqrt gives [2**15, 2**16)).
    shift : In(unsigned(6))
        0..63 (``rshift_round``'s right shift; 0 is no shift). Shifts >= 47 give 0, as
        rshift_round does for |x·w·mant| < 2**46.
    o_stream : Out(stream.Signature(signed(16)))
        ``y``, in input order.
    busy : Out(1)
        An element is inside the pipeline (accepted, output not yet taken).

    ``mant`` and ``shift`` are per-vector parameters: hold them from the cycle in which the
    first element of a vector transfers until ``busy`` falls after its last output (they pass
    a register before use, and a change reaches every element still inside).

    Pipeline (8 registers deep, every multiply has registered operands and product)
    --------
    0. ``x``, ``w`` (SB_MAC16 operand registers); also ``mant`` and ``shift`` (every cycle).
    1. ``p = x·w`` (signed 16x16, < 2**30 in magnitude, 32 bits).
    2. Two 16x16 partial products of ``p·mant``: ``lo = p[0:16]·mant`` (unsigned x unsigned)
       and ``hi = p[16:32]·mant_s`` (signed x signed), where ``mant_s`` is mant's bits read as
       signed, i.e. ``mant - 2**16·mant[15]``; the missing ``p[16:32]·mant[15]·2**16`` is
       added back in the next stage. (An SB_MAC16 multiplies 16x16 of one signedness as
       yosys infers it; ``mant`` is unsigned 16 bits and ``p``'s high half signed.)
    3. ``hi + (p[16:32]·mant[15] << 16)``: a 17-bit add on ``hi``'s upper half.
    4. ``v = x·w·mant = lo + (hi' << 16)``, 48 bits signed (a 32-bit add).
    5. Arithmetic shift of ``2v`` by ``8·(shift // 8)``, kept to 25 bits, and whether it fits
       them (a byte-range compare with the sign chosen by ``shift // 8``).
    6. Shift by ``shift % 8`` to ``t = floor(2v / 2**shift)``, clamped to 18 bits signed (a
       fit check of the top bits chosen by ``shift % 8``).
    7. ``y = sat16((t + 1) >> 1)``: ``floor(v / 2**s + 1/2) = floor((floor(2v / 2**s) + 1) / 2)``
       (the rounding add needs no 48-bit adder), the output register.

    Latency and throughput
    ----------------------
    ``o_stream.valid`` rises 8 cycles after the cycle in which an element transfers (attribute
    ``latency``); one element per cycle. Back-pressure stalls the whole pipeline:
    ``i_stream.ready = ~o_stream.valid | o_stream.ready`` (one gate from ``o_stream.ready``),
    so ready drops exactly while a finished element waits to be taken; no element is lost or
    duplicated. ``o_stream.ready`` may drop at any time.
    """

    latency = 8

    def __init__(self):
        super().__init__({
            "i_stream": In(stream.Signature(ApplyBeat())),
            "mant": In(unsigned(MANT_BITS)),
            "shift": In(unsigned(SHIFT_BITS)),
            "o_stream": Out(stream.Signature(signed(X_BITS))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        T_BITS = X_BITS + 2                          # floor(2v / 2**s) kept to 18 bits
        C_BITS = T_BITS + 7                          # after the coarse shift: room for 0..7 more
        V_BITS = 2 * X_BITS + MANT_BITS              # x·w·mant: 48 bits signed

        # per-vector parameters, registered
        mant = Signal(MANT_BITS, reset_less=True)
        shift = Signal(SHIFT_BITS, reset_less=True)
        m.d.sync += [mant.eq(self.mant), shift.eq(self.shift)]

        stages = 8
        valid = Signal(stages)
        advance = ~self.o_stream.valid | self.o_stream.ready
        m.d.comb += [self.i_stream.ready.eq(advance), self.o_stream.valid.eq(valid[-1]),
                     self.busy.eq(valid.any())]

        x = Signal(signed(X_BITS), reset_less=True)
        w = Signal(signed(X_BITS), reset_less=True)
        p = Signal(signed(2 * X_BITS), reset_less=True)
        lo = Signal(2 * X_BITS, reset_less=True)
        hi = Signal(signed(2 * X_BITS), reset_less=True)
        hi_fix = Signal(signed(X_BITS), reset_less=True)      # p[16:32] if mant[15] else 0
        lo3 = Signal(2 * X_BITS, reset_less=True)
        hi3 = Signal(signed(2 * X_BITS + 1), reset_less=True)
        v2 = Signal(signed(V_BITS + 1), reset_less=True)     # 2·x·w·mant
        coarse = Signal(signed(C_BITS), reset_less=True)
        coarse_fits = Signal(reset_less=True)
        sign = Signal(reset_less=True)
        t = Signal(signed(T_BITS), reset_less=True)
        y = Signal(signed(X_BITS), reset_less=True)
        p_hi = p[X_BITS:].as_signed()
        # Overflow of t = 2v >> shift beyond T_BITS, in two parts that need no variable mask:
        # the coarse shift's result must fit C_BITS (bits C_BITS-1+8k.. of 2v equal the sign:
        # one of three fixed byte ranges), and the fine shift's result T_BITS (bits
        # T_BITS-1+f.. of coarse equal its sign).
        byte_eq = [(v2[i:i + 8] == v2[-1].replicate(8)) for i in range(C_BITS - 1, V_BITS, 8)]
        coarse_fits_k = [C(1, 1)] * 8
        for k in range(len(byte_eq)):
            coarse_fits_k[k] = Cat(*byte_eq[k:]).all()
        top_eq = [C(1, 1)] * (C_BITS - T_BITS + 1)       # top_eq[f]: coarse[T_BITS-1+f:] equal
        for f in range(C_BITS - T_BITS - 1, -1, -1):
            top_eq[f] = top_eq[f + 1] & (coarse[T_BITS - 1 + f] == coarse[-1])
        fine_fits = Cat(*top_eq[:8]).bit_select(shift[:3], 1)
        fine = (coarse >> shift[:3])[:T_BITS].as_signed()
        t_max = (1 << (T_BITS - 1)) - 1
        rounded = ((t + 1) >> 1)[:T_BITS]         # in [-2**16, 2**16]: 18 bits signed
        rounded_fits = (rounded[X_BITS - 1:] == 0) | (rounded[X_BITS - 1:] == 0b111)
        y_max = (1 << (X_BITS - 1)) - 1

        with m.If(advance):
            m.d.sync += [
                valid.eq(Cat(self.i_stream.valid, valid[:-1])),
                # 0
                x.eq(self.i_stream.p.x), w.eq(self.i_stream.p.w),
                # 1
                p.eq(x * w),
                # 2
                lo.eq(p[:X_BITS] * mant),
                hi.eq(p_hi * mant.as_signed()),
                hi_fix.eq(Mux(mant[-1], p_hi, 0)),
                # 3
                lo3.eq(lo),
                hi3.eq(Cat(hi[:X_BITS], hi[X_BITS:].as_signed() + hi_fix)),
                # 4
                v2.eq(Cat(C(0, 1), lo3[:X_BITS], (lo3[X_BITS:] + hi3)[:V_BITS - X_BITS])),
                # 5
                coarse.eq(v2 >> Cat(C(0, 3), shift[3:])),
                coarse_fits.eq(Cat(*coarse_fits_k).bit_select(shift[3:], 1)),
                sign.eq(v2[-1]),
                # 6
                t.eq(Mux(coarse_fits & fine_fits, fine, Mux(sign, -t_max - 1, t_max))),
                # 7
                y.eq(Mux(rounded_fits, rounded, Mux(rounded[-1], -y_max - 1, y_max))),
            ]
        m.d.comb += self.o_stream.payload.eq(y)
        return m


class RMSNorm(wiring.Component):
    """RMSNorm of an int16 vector, ``arith.rmsnorm(x, w_q, w_frac, out_frac, eps_q)``: a
    :class:`NormStats` and a :class:`NormApply` joined. The vector is streamed twice: once
    into ``stats_stream`` (``x`` alone) for the statistics, then with its weights into
    ``apply_stream``.

    Parameters
    ----------
    max_n : int
        The longest vector, as for :class:`NormStats`.

    Ports
    -----
    stats_stream : In(stream.Signature(StatsBeat()))
        First pass: ``{x, last}``; this is :class:`NormStats`'s input.
    eps_q : In(unsigned(32))
        As for :class:`NormStats`: sampled in the cycle the first pass's ``last`` transfers.
    frac_diff : In(signed(6))
        ``w_frac - out_frac``, sampled with ``eps_q``. The apply shift is ``e + frac_diff``,
        clamped to 0..63 (a negative shift, i.e. a left shift, is outside the contract: the
        converter's formats give ``e + w_frac - out_frac >= 1``).
    apply_stream : In(stream.Signature(NormBeat()))
        Second pass: ``{x, w, last}``, the same elements (in any order) with their weights.
        Accepted only once the vector's statistics are ready; ``last`` ends the vector.
    o_stream : Out(stream.Signature(signed(16)))
        ``y_j`` in the order of the second pass.

    Timing
    ------
    The statistics are ready ``stats_latency`` (= ``NormStats.latency``) cycles after the first
    pass's ``last`` transfers, plus one cycle to move them into the apply parameters; the
    second pass then runs at one element per cycle, ``NormApply.latency`` cycles deep. The next
    vector's first pass may stream while the second pass runs; its statistics wait in
    :class:`NormStats` until the previous vector has left :class:`NormApply`. Back-pressure as
    in the two parts; no ``ready`` here depends combinationally on ``o_stream.ready`` except
    ``apply_stream.ready`` (through NormApply's one gate).
    """

    def __init__(self, max_n: int):
        self.stats_latency = stats_latency(max_n)     # validates max_n
        self.max_n = max_n
        super().__init__({
            "stats_stream": In(stream.Signature(StatsBeat())),
            "eps_q": In(unsigned(EPS_BITS)),
            "frac_diff": In(signed(SHIFT_BITS)),
            "apply_stream": In(stream.Signature(NormBeat())),
            "o_stream": Out(stream.Signature(signed(X_BITS))),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.stats = stats = NormStats(self.max_n)
        m.submodules.apply = apply = NormApply()

        wiring.connect(m, wiring.flipped(self.stats_stream), stats.i_stream)
        wiring.connect(m, apply.o_stream, wiring.flipped(self.o_stream))
        m.d.comb += stats.eps_q.eq(self.eps_q)

        # frac_diff travels with the vector: NormStats takes no new vector before its result
        # has been moved into mant/shift below, so one register suffices
        frac_diff = Signal(signed(SHIFT_BITS))
        with m.If(self.stats_stream.valid & self.stats_stream.ready & self.stats_stream.p.last):
            m.d.sync += frac_diff.eq(self.frac_diff)

        held = Signal()                     # mant/shift belong to the vector being applied
        mant = Signal(MANT_BITS)
        shift = Signal(SHIFT_BITS)
        new_shift = Signal(signed(SHIFT_BITS + 2))          # e + frac_diff in [-32, 94]
        m.d.comb += new_shift.eq(stats.o_stream.p.e + frac_diff)
        # a new result may replace mant/shift only once the previous vector has left NormApply
        m.d.comb += stats.o_stream.ready.eq(~held & ~apply.busy)
        with m.If(stats.o_stream.valid & stats.o_stream.ready):
            m.d.sync += [held.eq(1), mant.eq(stats.o_stream.p.mant),
                         shift.eq(Mux(new_shift[-1], 0,                      # clamp to 0..63
                                      Mux(new_shift[SHIFT_BITS], (1 << SHIFT_BITS) - 1,
                                          new_shift[:SHIFT_BITS])))]

        m.d.comb += [
            apply.mant.eq(mant),
            apply.shift.eq(shift),
            apply.i_stream.p.x.eq(self.apply_stream.p.x),
            apply.i_stream.p.w.eq(self.apply_stream.p.w),
            apply.i_stream.valid.eq(self.apply_stream.valid & held),
            self.apply_stream.ready.eq(apply.i_stream.ready & held),
        ]
        with m.If(self.apply_stream.valid & self.apply_stream.ready & self.apply_stream.p.last):
            m.d.sync += held.eq(0)
        return m
