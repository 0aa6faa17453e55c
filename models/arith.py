"""The arithmetic contract: every integer operation of the golden model.

docs/arithmetic.md explains each function below; the gateware reproduces them bit for bit and
its testbenches call them. Everything here is exact integer arithmetic (NumPy int64 for
vectors, Python ints for per-token scalars): no floats at run time. Floats appear only in
:func:`sigmoid_lut` (generating a table once) and in the converter.

Fixed-point notation: a value ``v`` "with ``F`` fractional bits" stands for ``v / 2**F``.
Q1.15 means unsigned 0..32768 standing for 0..1.

Rounding: ``rshift_round(x, s)`` is round-half-up (``floor(x / 2**s + 1/2)``), which is an add
and an arithmetic shift in hardware; ``s <= 0`` is an exact left shift.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "ARITH_VERSION", "PRE_FRAC", "LOGIT_FRAC", "ONE_Q15",
    "SIG_LUT_SIZE", "SIG_STEP_BITS", "ACT_MAX", "QUANT_BITS",
    "sat", "sat16", "rshift_round", "irsqrt", "norm_stats", "rmsnorm",
    "quantize_activations", "ternary_accumulate", "rescale_factor", "rescale",
    "sigmoid_lut", "sigmoid_q", "silu_q", "forget_gate", "mlgru_update", "output_gate",
    "glu", "embed", "residual_add", "argmax",
]

ARITH_VERSION = 1          # bump when any function below changes its results

PRE_FRAC = 10              # i, f, g, gate and up projection outputs; the state h: int16, ±32
LOGIT_FRAC = 8             # LM head output: int16, ±128
ONE_Q15 = 1 << 15          # 1.0 in Q1.15

ACT_MAX = 127              # int8 activations are in [-127, 127]; -128 never occurs
QUANT_BITS = 15            # the quantizer normalizes |x·g| to this many bits before scaling
QUANT_SHIFT = 23           # A = (v · recip + 2**22) >> 23

SIG_LUT_SIZE = 256         # σ(k/16) for k = 0..255, Q1.15
SIG_STEP_BITS = 6          # table step 2**-4 in a PRE_FRAC (2**-10) input: 6 fraction bits

IRSQRT_NORM_BITS = 30      # irsqrt normalizes its input into [2**28, 2**30)


# --------------------------------------------------------------------------- primitives

def sat(x, bits: int):
    """Saturate to a signed ``bits``-bit two's complement range."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi)
    return min(max(x, lo), hi)


def sat16(x):
    return sat(x, 16)


def rshift_round(x, s: int):
    """``floor(x / 2**s + 1/2)`` for ``s >= 1``; ``x * 2**-s`` for ``s <= 0`` (exact)."""
    if s <= 0:
        return x * (1 << -s) if not isinstance(x, np.ndarray) else x << -s
    return (x + (1 << (s - 1))) >> s


def _as_i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


# --------------------------------------------------------------------------- RMSNorm

def irsqrt(u: int) -> tuple[int, int]:
    """Integer reciprocal square root: ``1/sqrt(u) ≈ mant · 2**-e``.

    ``u`` in [1, 2**62). Normalize by an even shift ``2s`` so that ``un = u·4**s`` (floor when
    shifting right) lies in [2**28, 2**30); ``q = isqrt(un)`` in [2**14, 2**15);
    ``mant = (2**30 - 1) // q`` in [2**15, 2**16); ``e = 30 - s``, in [16, 46].
    Relative error below 2**-13.
    """
    u = int(u)
    if not 1 <= u < (1 << 62):
        raise ValueError(f"irsqrt input must be in [1, 2**62), not {u}")
    s = (IRSQRT_NORM_BITS - u.bit_length()) // 2
    un = u << (2 * s) if s >= 0 else u >> (-2 * s)
    q = math.isqrt(un)
    mant = ((1 << IRSQRT_NORM_BITS) - 1) // q
    return mant, IRSQRT_NORM_BITS - s


def norm_stats(x, eps_q: int) -> tuple[int, int]:
    """Statistics of an RMSNorm over int16 vector ``x``: ``irsqrt(sum(x²) // n + eps_q)``.

    ``eps_q = max(1, round(eps · 4**F))`` for an input with ``F`` fractional bits, so the
    result stands for ``rsqrt(mean(x²) + eps)`` in units of ``2**F``. Returns ``(mant, e)``.
    """
    x = _as_i64(x)
    ss = int(np.dot(x, x))              # n · 2**30 at most: 43 bits for n <= 4096
    return irsqrt(ss // x.size + int(eps_q))


def rmsnorm(x, w_q, w_frac: int, out_frac: int, eps_q: int) -> np.ndarray:
    """RMSNorm with a learned weight: ``y = x · w · rsqrt(mean(x²) + eps)``.

    ``x``: int16 (any fractional bits F; F enters only through ``eps_q``). ``w_q``: int16 with
    ``w_frac`` fractional bits. Output: int16 with ``out_frac`` fractional bits,
    ``y = sat16(rshift_round(x · w_q · mant, e + w_frac - out_frac))``.
    """
    mant, e = norm_stats(x, eps_q)
    prod = _as_i64(x) * _as_i64(w_q) * mant          # 16 + 16 + 16 bits: < 2**47
    return sat16(rshift_round(prod, e + w_frac - out_frac))


# --------------------------------------------------------------------------- BitLinear

def quantize_activations(x, g_q) -> tuple[np.ndarray, int, int]:
    """BitLinear's absmax int8 quantization of ``x ∘ g`` (its own RMSNorm scale cancels).

    ``v = x · g_q`` (exact, |v| <= 2**30); ``mv = max|v|``. If ``mv == 0`` all activations are 0
    and ``(A, 0, 0)`` is returned. Else normalize to 15 bits with ``sh = bitlen(mv) - 15``:
    ``vn = sign(v) · (|v| >> sh)`` (``|v| << -sh`` when ``sh < 0``), ``mvn = max|vn|`` in
    [2**14, 2**15); ``recip = (127 · 2**23) // mvn``; ``A = (vn · recip + 2**22) >> 23``, in
    [-127, 127]. Returns ``(A as int8, mvn, sh)``.
    """
    v = _as_i64(x) * _as_i64(g_q)
    mag = np.abs(v)
    mv = int(mag.max()) if mag.size else 0
    if mv == 0:
        return np.zeros(v.shape, np.int8), 0, 0
    sh = mv.bit_length() - QUANT_BITS
    magn = mag >> sh if sh >= 0 else mag << -sh
    vn = np.where(v < 0, -magn, magn)
    mvn = mv >> sh if sh >= 0 else mv << -sh
    recip = (ACT_MAX << QUANT_SHIFT) // mvn
    a = (vn * recip + (1 << (QUANT_SHIFT - 1))) >> QUANT_SHIFT
    return a.astype(np.int8), mvn, sh


def ternary_accumulate(trits, a) -> np.ndarray:
    """``acc[i] = sum_j T[i, j] · A[j]``: additions and subtractions only, exact.

    ``trits``: int8 in {-1, 0, 1}, shape [rows, n]; ``a``: int8 [n]. |acc| <= 127 · n.
    """
    return np.asarray(trits, dtype=np.int64) @ _as_i64(a)


def _norm16(p: int) -> tuple[int, int]:
    """Truncate a positive product to its top 16 bits: ``(p >> t, t)``, ``t = bitlen(p) - 16``."""
    t = p.bit_length() - 16
    return (p >> t, t) if t > 0 else (p, 0)


def rescale_factor(mvn: int, sh: int, mant: int, e: int, gamma_mant: int, scale_exp: int):
    """The per-token factor of a BitLinear: ``out = acc · S · 2**-z``.

    Stands for ``γ · max|y| / 127`` converted to the output format. ``γ/127 ≈ gamma_mant ·
    2**-gamma_exp`` (``gamma_mant`` in [2**15, 2**16)), and ``scale_exp = gamma_exp + g_frac -
    out_frac`` is the per-projection constant. ``p1 = mvn · mant`` and ``p2 = top16(p1) ·
    gamma_mant`` are truncated to their top 16 bits (shifts ``t1``, ``t2``): ``S = top16(p2)``,
    ``z = e + scale_exp - sh - t1 - t2``. Returns ``(S, z)``; ``S == 0`` when ``mvn == 0``.
    """
    if mvn == 0:
        return 0, 0
    p1, t1 = _norm16(mvn * mant)
    s, t2 = _norm16(p1 * gamma_mant)
    return s, e + scale_exp - sh - t1 - t2


def rescale(acc, s: int, z: int) -> np.ndarray:
    """``out = sat16(rshift_round(acc · S, z))``; for ``z < 0`` a left shift, saturated.

    ``z`` is clamped to [-16, 62] first, which changes no result: for ``acc != 0``,
    ``|acc · S| >= 2**15`` saturates after 16 left shifts, and ``|acc · S| < 2**61``.
    """
    z = min(max(z, -16), 62)
    return sat16(rshift_round(_as_i64(acc) * s, z))


# --------------------------------------------------------------------------- non-linearities

def sigmoid_lut() -> np.ndarray:
    """``LUT[k] = round(σ(k/16) · 2**15)``, k = 0..255, uint16 (the only float evaluation)."""
    k = np.arange(SIG_LUT_SIZE, dtype=np.float64) / 16.0
    return np.round(ONE_Q15 / (1.0 + np.exp(-k))).astype(np.uint16)


_SIG_LUT = sigmoid_lut()


def sigmoid_q(x, lut=None) -> np.ndarray:
    """σ(x) for int16 ``x`` with PRE_FRAC fractional bits; result Q1.15 in [0, 32768].

    ``a = min(|x|, 2**14 - 1)``; ``k = a >> 6``, ``r = a & 63``;
    ``p = L[k] + (((L[min(k+1, 255)] - L[k]) · r + 32) >> 6)``; σ = p for x >= 0, 2**15 - p
    for x < 0 (σ(-x) = 1 - σ(x), so one half-table serves both signs).
    """
    lut = _SIG_LUT if lut is None else lut
    table = np.asarray(lut, dtype=np.int64)
    x = _as_i64(x)
    a = np.minimum(np.abs(x), (1 << 14) - 1)
    k = a >> SIG_STEP_BITS
    r = a & ((1 << SIG_STEP_BITS) - 1)
    lo = table[k]
    hi = table[np.minimum(k + 1, SIG_LUT_SIZE - 1)]
    p = lo + (((hi - lo) * r + (1 << (SIG_STEP_BITS - 1))) >> SIG_STEP_BITS)
    return np.where(x < 0, ONE_Q15 - p, p)


def silu_q(x, lut=None) -> np.ndarray:
    """silu(x) = x · σ(x): ``rshift_round(x · sigmoid_q(x), 15)``, same format as ``x``."""
    return rshift_round(_as_i64(x) * sigmoid_q(x, lut), 15)


# --------------------------------------------------------------------------- MLGRU and GLU

def forget_gate(f_pre, lb_q=None, lut=None) -> np.ndarray:
    """``f = σ(f_pre)``, then ``f = lb + rshift_round((2**15 - lb) · f, 15)`` when the layer
    has a lower bound ``lb_q`` (Q1.15, per channel). Result Q1.15."""
    f = sigmoid_q(f_pre, lut)
    if lb_q is not None:
        lb = _as_i64(lb_q)
        f = lb + rshift_round((ONE_Q15 - lb) * f, 15)
    return f


def mlgru_update(h, i_pre, f_q, lut=None) -> np.ndarray:
    """``h' = rshift_round(f · h + (2**15 - f) · silu(i_pre), 15)``: MODEL.md's
    ``h = f·h + silu(i)·(1-f)`` with one rounding. ``h``, ``i_pre``: int16 PRE_FRAC; the result
    is a convex combination of int16 values, so it stays int16."""
    f = _as_i64(f_q)
    acc = f * _as_i64(h) + (ONE_Q15 - f) * silu_q(i_pre, lut)
    return sat16(rshift_round(acc, 15))


def output_gate(g_normed, g_frac: int, h, o_frac: int, lut=None) -> np.ndarray:
    """``o = rms(g)·silu(h)``: ``sat16(rshift_round(g_n · silu(h), g_frac + PRE_FRAC - o_frac))``.
    ``g_normed`` has ``g_frac`` fractional bits (the g_norm output format), h PRE_FRAC, and o
    ``o_frac`` (per layer, calibrated by the converter)."""
    prod = _as_i64(g_normed) * silu_q(h, lut)
    return sat16(rshift_round(prod, g_frac + PRE_FRAC - o_frac))


def glu(gate, up, u_frac: int, lut=None) -> np.ndarray:
    """``u = silu(gate) · up``: ``sat16(rshift_round(silu(gate) · up, 2·PRE_FRAC - u_frac))``;
    ``u_frac`` per layer, calibrated by the converter."""
    prod = silu_q(gate, lut) * _as_i64(up)
    return sat16(rshift_round(prod, 2 * PRE_FRAC - u_frac))


# --------------------------------------------------------------------------- ends of the network

def embed(row_q, row_scale: int, emb_shift: int) -> np.ndarray:
    """Residual stream from an int8 embedding row with its uint16 row scale:
    ``r = sat16(rshift_round(row_q · row_scale, emb_shift))``."""
    return sat16(rshift_round(_as_i64(row_q) * int(row_scale), emb_shift))


def residual_add(r, delta, shift: int) -> np.ndarray:
    """``r' = sat16(rshift_round(r, shift) + delta)``: the residual moves to a format with
    ``shift`` fewer fractional bits (``shift >= 0``) as it takes the sublayer's output."""
    if shift < 0:
        raise ValueError(f"residual formats never gain fractional bits (shift {shift})")
    return sat16(rshift_round(_as_i64(r), shift) + _as_i64(delta))


def argmax(logits) -> int:
    """Index of the largest logit; the lowest index wins a tie."""
    return int(np.argmax(np.asarray(logits)))
