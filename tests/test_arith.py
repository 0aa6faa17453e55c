"""Tests of the arithmetic contract (models/arith.py, docs/arithmetic.md).

Every expectation is derived independently of the code under test: from the formulas of the
docstrings evaluated with Python ints and ``fractions.Fraction``, or from float math with an
error bound derived in the test.
"""

import math
from fractions import Fraction

import numpy as np
import pytest

from mmfree.models import arith
from mmfree.models.config import ModelConfig
from mmfree.models.quantized import make_norm

HALF = Fraction(1, 2)


def round_half_up(q) -> int:
    """floor(q + 1/2) for a Fraction or int."""
    return math.floor(Fraction(q) + HALF)


def clamp16(v: int) -> int:
    return min(max(v, -32768), 32767)


def rng_for(seed):
    print(f"seed {seed}")
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- rshift_round, sat

def test_rshift_round_matches_floor_formula():
    for s in range(1, 14):
        for x in range(-3000, 3001):
            assert arith.rshift_round(x, s) == round_half_up(Fraction(x, 2 ** s)), (x, s)


def test_rshift_round_numpy_matches_python():
    rng = rng_for(11)
    x = rng.integers(-2 ** 46, 2 ** 46, 5000)
    for s in (1, 5, 15, 23, 40):
        got = arith.rshift_round(x, s)
        want = [round_half_up(Fraction(int(v), 2 ** s)) for v in x]
        assert got.tolist() == want


def test_rshift_round_ties_go_up_also_for_negative_values():
    for s in (1, 3, 15):
        h = 1 << (s - 1)
        assert arith.rshift_round(h, s) == 1             # +0.5 -> 1
        assert arith.rshift_round(-h, s) == 0            # -0.5 -> 0 (half up, not away from 0)
        assert arith.rshift_round(3 * h, s) == 2         # 1.5 -> 2
        assert arith.rshift_round(-3 * h, s) == -1       # -1.5 -> -1
        assert arith.rshift_round(-h - 1, s) == -1       # just below -0.5 -> -1
        assert arith.rshift_round(np.array([h, -h, 3 * h, -3 * h]), s).tolist() == [1, 0, 2, -1]


@pytest.mark.parametrize("s", [0, -1, -5, -20])
def test_rshift_round_nonpositive_shift_is_exact_left_shift(s):
    for x in (0, 1, -1, 12345, -32768, 32767):
        assert arith.rshift_round(x, s) == x * 2 ** (-s)
    arr = np.array([0, 1, -1, 12345, -32768, 32767], dtype=np.int64)
    assert arith.rshift_round(arr, s).tolist() == [int(v) * 2 ** (-s) for v in arr]


def test_sat16_scalars_and_arrays():
    cases = {-2 ** 40: -32768, -32769: -32768, -32768: -32768, -1: -1, 0: 0, 32767: 32767,
             32768: 32767, 2 ** 40: 32767}
    for x, want in cases.items():
        assert arith.sat16(x) == want
    arr = np.array(list(cases), dtype=np.int64)
    assert arith.sat16(arr).tolist() == list(cases.values())
    assert arith.sat(np.array([-129, -128, 127, 128]), 8).tolist() == [-128, -128, 127, 127]


# --------------------------------------------------------------------------- irsqrt

REL = Fraction(1, 2 ** 13)


def check_irsqrt(u: int):
    mant, e = arith.irsqrt(u)
    assert isinstance(mant, int) and isinstance(e, int)
    assert 2 ** 15 <= mant < 2 ** 16, (u, mant)
    assert 16 <= e <= 46, (u, e)
    # |mant · 2**-e · sqrt(u) - 1| < 2**-13, squared and in integers:
    # (1 - 2**-13)**2 < mant**2 · u / 4**e < (1 + 2**-13)**2
    lhs = mant * mant * u * 2 ** 26
    assert (2 ** 13 - 1) ** 2 * 4 ** e < lhs < (2 ** 13 + 1) ** 2 * 4 ** e, u
    # and the same against float 1/sqrt(u) (float64: 1e-16 relative, far below the bound)
    approx = mant * 2.0 ** -e
    assert abs(approx * math.sqrt(u) - 1) < 2.0 ** -13, u


@pytest.mark.parametrize("u", [1, 2, 3, 4, 5, 2 ** 28 - 1, 2 ** 28, 2 ** 28 + 1, 2 ** 30 - 1, 2 ** 30,
                               2 ** 30 + 1, 2 ** 31 - 1, 2 ** 61, 2 ** 61 + 1, 2 ** 62 - 1])
def test_irsqrt_edges(u):
    check_irsqrt(u)


def test_irsqrt_exact_powers_of_four():
    # 1/sqrt(4**k) = 2**-k: isqrt is exact on these, so only the (2**30 - 1) // q floor remains
    for k in range(31):
        mant, e = arith.irsqrt(4 ** k)
        assert mant == (2 ** 30 - 1) // 2 ** 14 == 65535
        assert e == 16 + k


def test_irsqrt_small_exhaustive():
    for u in range(1, 1 << 14):
        check_irsqrt(u)


def test_irsqrt_random():
    rng = rng_for(2024)
    for _ in range(5000):
        bits = int(rng.integers(1, 63))
        u = (1 << (bits - 1)) | int(rng.integers(0, 1 << 62)) % (1 << (bits - 1)) if bits > 1 else 1
        assert u.bit_length() == bits
        check_irsqrt(u)


@pytest.mark.parametrize("u", [0, -1, 2 ** 62, 2 ** 64])
def test_irsqrt_out_of_range(u):
    with pytest.raises(ValueError) as exc:
        arith.irsqrt(u)
    assert str(exc.value) == f"irsqrt input must be in [1, 2**62), not {u}"


# --------------------------------------------------------------------------- rmsnorm

def rmsnorm_bound_check(x, p):
    """rmsnorm(x) vs float RMSNorm: |y - y_true| <= 1/2 + |y_true| · err, where err combines the
    irsqrt error (2**-13) and the floor of the mean (``ms <= ss/n < ms + 1`` changes the rsqrt
    by a factor within [1, 1 + 1/(2(ms + eps_q))]). Also checks that nothing saturates."""
    xi = [int(v) for v in x]
    n = len(xi)
    ss = sum(v * v for v in xi)
    ms = ss // n
    y = arith.rmsnorm(np.array(xi, dtype=np.int64), p.w_q, p.w_frac, p.out_frac, p.eps_q)
    # float RMSNorm in units of the output LSB; eps in units of 4**-F is eps_q
    inv = 1.0 / math.sqrt(ss / n + p.eps_q)
    err = (1 + 2.0 ** -13) * (1 + 1.0 / (2 * (ms + p.eps_q))) - 1
    for j in range(n):
        true = xi[j] * int(p.w_q[j]) * 2.0 ** (p.out_frac - p.w_frac) * inv
        assert abs(int(y[j]) - true) <= 0.5 + abs(true) * err + 1e-9, (j, int(y[j]), true)
        assert abs(true) * (1 + err) + 0.5 < 32767.5          # never near saturation
    return y


@pytest.mark.parametrize("n", [1, 2, 40, 72, 1024, 4096])
def test_rmsnorm_float_and_no_saturation(n):
    rng = rng_for(100 + n)
    for trial in range(6):
        w = rng.normal(1.0, 0.3, n)
        if trial % 2:
            w[rng.integers(0, n)] = rng.choice([-1, 1]) * rng.uniform(3, 8)    # an outlier
        in_frac = int(rng.integers(0, 15))
        p = make_norm(w, 1e-6, in_frac)
        jmax = int(np.argmax(np.abs(p.w_q)))
        vectors = [rng.integers(-32768, 32768, n),
                   rng.integers(-32768, 32768, n) >> int(rng.integers(0, 15)),
                   np.zeros(n, dtype=np.int64)]
        for c in (1, 2, 7, 181, 32767, -32768):          # one-hot at the largest weight: |rms| = sqrt(n)
            v = np.zeros(n, dtype=np.int64)
            v[jmax] = c
            vectors.append(v)
        v = np.full(n, -32768, dtype=np.int64)           # constant vector
        vectors.append(v)
        for x in vectors:
            y = rmsnorm_bound_check(x, p)
            assert y.min() > -32768 and y.max() < 32767


def test_rmsnorm_all_zero_input():
    p = make_norm(np.linspace(0.5, 1.5, 40), 1e-6, 10)
    y = arith.rmsnorm(np.zeros(40, dtype=np.int64), p.w_q, p.w_frac, p.out_frac, p.eps_q)
    assert y.tolist() == [0] * 40


def test_rmsnorm_matches_docstring_formula_with_python_ints():
    rng = rng_for(7)
    for _ in range(50):
        n = int(rng.integers(1, 100))
        x = [int(v) for v in rng.integers(-32768, 32768, n)]
        w = [int(v) for v in rng.integers(-32768, 32768, n)]
        w_frac, out_frac, eps_q = int(rng.integers(0, 16)), int(rng.integers(0, 16)), int(rng.integers(1, 5000))
        u = sum(v * v for v in x) // n + eps_q
        # reference irsqrt from its docstring
        s = (30 - u.bit_length()) // 2
        un = u << (2 * s) if s >= 0 else u >> (-2 * s)
        mant, e = (2 ** 30 - 1) // math.isqrt(un), 30 - s
        want = [clamp16(round_half_up(Fraction(xj * wj * mant, 2 ** (e + w_frac - out_frac))))
                for xj, wj in zip(x, w)]
        got = arith.rmsnorm(np.array(x), np.array(w), w_frac, out_frac, eps_q)
        assert got.tolist() == want


# --------------------------------------------------------------------------- quantize_activations

def check_quantized(x, g):
    x = np.asarray(x, dtype=np.int64)
    g = np.asarray(g, dtype=np.int64)
    A, mvn, sh = arith.quantize_activations(x, g)
    assert A.dtype == np.int8 and A.shape == x.shape
    v = [int(a) * int(b) for a, b in zip(x, g)]
    mv = max(abs(t) for t in v)
    if mv == 0:
        assert A.tolist() == [0] * len(v) and (mvn, sh) == (0, 0)
        return 0, 0
    assert int(A.min()) >= -127 and int(A.max()) <= 127
    assert 2 ** 14 <= mvn < 2 ** 15
    for j, t in enumerate(v):
        if abs(t) == mv:
            assert int(A[j]) == (127 if t > 0 else -127), j
    # |A - 127·v/mv| <= 1/2 + 127/2**14 (magnitude truncation to 15 bits) + 2**-8 (recip floor)
    bound = HALF + Fraction(127, 2 ** 14) + Fraction(1, 2 ** 8)
    exact = 0
    for a, t in zip(A.tolist(), v):
        ideal = Fraction(127 * t, mv)
        assert abs(a - ideal) <= bound, (a, ideal)
        assert abs(a - round_half_up(ideal)) <= 1
        exact += a == round_half_up(ideal)
    return exact, len(v)


def test_quantize_activations_random():
    rng = rng_for(31)
    exact = total = 0
    for trial in range(600):
        n = int(rng.integers(1, 200))
        x = rng.integers(-32768, 32768, n) >> int(rng.integers(0, 16))
        g = rng.integers(-32768, 32768, n) >> int(rng.integers(0, 16))
        e, t = check_quantized(x, g)
        exact += e
        total += t
    print(f"exact {exact}/{total}")
    assert exact >= 0.95 * total


def test_quantize_activations_small_values_left_shift():
    # mv < 2**14: sh < 0, the normalization is an exact left shift
    A, mvn, sh = arith.quantize_activations(np.array([1, -1, 0]), np.array([1, 1, 1]))
    assert A.tolist() == [127, -127, 0] and mvn == 2 ** 14 and sh == -14
    check_quantized([3, -2, 1, 0], [1, 1, 1, 1])
    A, _, _ = arith.quantize_activations(np.array([3, -2, 1, 0]), np.array([1, 1, 1, 1]))
    assert A.tolist() == [127, round_half_up(Fraction(-254, 3)), round_half_up(Fraction(127, 3)), 0]


def test_quantize_activations_all_zero():
    for x, g in (([0] * 5, [7] * 5), ([3, -4, 5], [0, 0, 0])):
        A, mvn, sh = arith.quantize_activations(np.array(x), np.array(g))
        assert A.tolist() == [0] * len(x) and (mvn, sh) == (0, 0)


def test_quantize_activations_negative_dominant_and_int16_extremes():
    check_quantized([-32768, 5, 100, -7], [32767, 32767, 32767, 32767])
    A, _, _ = arith.quantize_activations(np.array([-32768, 5, 16384]), np.array([32767, 1, 32767]))
    assert A[0] == -127 and A.min() >= -127
    # (-32768)·(-32768) = 2**30: the largest possible |v|, positive
    check_quantized([-32768, 32767, -32768, 1], [-32768, -32768, 32767, 1])
    A, _, _ = arith.quantize_activations(np.array([-32768, 32767, -32768]), np.array([-32768, -32768, 32767]))
    assert A.tolist()[0] == 127
    assert abs(int(A[1]) - round_half_up(Fraction(127 * 32767 * -32768, 2 ** 30))) <= 1
    # every element negative with equal magnitude: all -127, never -128
    A, _, _ = arith.quantize_activations(np.full(64, -32768), np.full(64, 32767))
    assert A.tolist() == [-127] * 64
    A, _, _ = arith.quantize_activations(np.full(64, -32768), np.full(64, -32768))
    assert A.tolist() == [127] * 64


def test_quantize_activations_never_minus_128_near_ties():
    # vectors built so that many elements sit just below the maximum magnitude
    rng = rng_for(5)
    for _ in range(200):
        n = int(rng.integers(2, 64))
        m = int(rng.integers(1, 32768))
        x = -m + rng.integers(0, 3, n)
        g = rng.choice([-32768, 32767, 1, -1], n)
        check_quantized(x, g)


# --------------------------------------------------------------------------- ternary_accumulate

def test_ternary_accumulate_vs_python_loops():
    rng = rng_for(41)
    for _ in range(30):
        rows, n = int(rng.integers(1, 40)), int(rng.integers(1, 300))
        T = rng.integers(-1, 2, (rows, n)).astype(np.int8)
        A = rng.integers(-127, 128, n).astype(np.int8)
        want = [sum(int(T[i, j]) * int(A[j]) for j in range(n)) for i in range(rows)]
        got = arith.ternary_accumulate(T, A)
        assert got.tolist() == want


def test_ternary_accumulate_longest_row_extremes():
    n = ModelConfig.default_intermediate_size(2560)        # down_proj of the 2.7B model: 6912
    assert n == 6912
    T = np.stack([np.ones(n), -np.ones(n), np.zeros(n)]).astype(np.int8)
    for a, sign in ((127, 1), (-127, -1)):
        got = arith.ternary_accumulate(T, np.full(n, a, dtype=np.int8))
        assert got.tolist() == [sign * 127 * n, -sign * 127 * n, 0]
    alt = np.where(np.arange(n) % 2 == 0, 127, -127).astype(np.int8)
    assert arith.ternary_accumulate(T, alt).tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- rescale

def top16(p: int):
    t = max(p.bit_length() - 16, 0)
    return p >> t, t


def test_rescale_factor_vs_exact_rational():
    rng = rng_for(53)
    for _ in range(3000):
        mvn = int(rng.integers(2 ** 14, 2 ** 15))
        mant = int(rng.integers(2 ** 15, 2 ** 16))
        gamma_mant = int(rng.integers(2 ** 15, 2 ** 16))
        sh = int(rng.integers(-14, 17))
        e = int(rng.integers(16, 47))
        gamma_exp, g_frac, out_frac = int(rng.integers(10, 40)), int(rng.integers(0, 25)), int(rng.integers(0, 15))
        scale_exp = gamma_exp + g_frac - out_frac
        S, z = arith.rescale_factor(mvn, sh, mant, e, gamma_mant, scale_exp)
        assert 2 ** 15 <= S < 2 ** 16
        # γ/127 · max|y| in the output format, max|y| = mvn · 2**sh · mant · 2**-e · 2**-g_frac
        exact = (Fraction(gamma_mant, 2 ** gamma_exp) * mvn * Fraction(2) ** sh * Fraction(mant, 2 ** e)
                 * Fraction(1, 2 ** g_frac) * 2 ** out_frac)
        got = Fraction(S) * Fraction(2) ** -z
        # two truncations to 16 significant bits, each relative error in [0, 2**-15)
        assert exact * (1 - Fraction(1, 2 ** 15)) ** 2 < got <= exact


def test_rescale_factor_zero():
    assert arith.rescale_factor(0, 0, 40000, 20, 40000, 10) == (0, 0)


def test_rescale_vs_fraction_formula():
    rng = rng_for(59)
    for _ in range(400):
        S = int(rng.integers(2 ** 15, 2 ** 16))
        z = int(rng.integers(-20, 70))
        acc = rng.integers(-127 * 6912, 127 * 6912 + 1, 16)
        acc[:3] = [0, 127 * 6912, -127 * 6912]
        got = arith.rescale(acc, S, z)
        want = [clamp16(round_half_up(Fraction(int(a) * S) * Fraction(2) ** -z)) for a in acc]
        assert got.tolist() == want, (S, z)


def test_rescale_value_within_truncation_bound():
    """out ≈ acc · γ · max|y| / 127 within 1/2 + |exact| · 2**-14 when it does not saturate."""
    rng = rng_for(61)
    checked = 0
    for _ in range(2000):
        mvn, mant, gm = int(rng.integers(2 ** 14, 2 ** 15)), int(rng.integers(2 ** 15, 2 ** 16)), int(rng.integers(2 ** 15, 2 ** 16))
        sh, e, scale_exp = int(rng.integers(-14, 17)), int(rng.integers(16, 47)), int(rng.integers(0, 60))
        S, z = arith.rescale_factor(mvn, sh, mant, e, gm, scale_exp)
        factor = Fraction(gm * mvn * mant) * Fraction(2) ** -(e + scale_exp - sh)
        acc = int(rng.integers(-127 * 512, 127 * 512 + 1))
        out = int(arith.rescale(np.array([acc]), S, z)[0])
        exact = acc * factor
        if abs(exact) < 32767:
            assert abs(out - exact) <= HALF + abs(exact) * Fraction(1, 2 ** 14)
            checked += 1
        else:
            assert out == (32767 if exact > 0 else -32768)
    assert checked > 100


def test_rescale_saturates_both_ends():
    acc = np.array([127 * 6912, -127 * 6912, 1, -1, 0])
    assert arith.rescale(acc, 65535, 0).tolist() == [32767, -32768, 32767, -32768, 0]
    # z < 0: a left shift, saturated; z clamped to -16 changes nothing
    for z in (-1, -15, -16, -17, -40):
        assert arith.rescale(np.array([1, -1, 0]), 1, z).tolist() == \
            [clamp16(2 ** -z), clamp16(-(2 ** -z)), 0]
    assert arith.rescale(np.array([3, -3]), 1, -2).tolist() == [12, -12]
    # large z: everything rounds to 0 (or to half up)
    assert arith.rescale(np.array([127 * 6912, -127 * 6912]), 65535, 70).tolist() == [0, 0]
    assert arith.rescale(np.array([1, -1]), 1, 1).tolist() == [1, 0]


# --------------------------------------------------------------------------- sigmoid, silu

# Error bound of sigmoid_q against 32768·σ(x) (in Q1.15 LSBs):
#  LUT rounding <= 1/2, interpolation rounding <= 1/2, linear interpolation on a step h = 1/16:
#  max|σ''| · h² / 8 · 32768 with max|σ''| = sqrt(3)/18; clamping |x| at 16: 32768·(1 - σ(15.9)).
SIG_BOUND = 0.5 + 0.5 + math.sqrt(3) / 18 * (1 / 16) ** 2 / 8 * 32768 + 32768 / (1 + math.exp(15.9))
ALL16 = np.arange(-32768, 32768, dtype=np.int64)


def float_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_sigmoid_lut():
    lut = arith.sigmoid_lut()
    assert lut.dtype == np.uint16 and lut.shape == (256,)
    for k in range(256):
        assert int(lut[k]) == round(32768 / (1 + math.exp(-k / 16))), k
    assert lut[0] == 16384
    assert np.all(np.diff(lut.astype(np.int64)) >= 0)
    # first k with 32768·(1 - σ(k/16)) < 1/2 and every entry from there on is 32768
    k0 = next(k for k in range(256) if 32768 / (1 + math.exp(k / 16)) < 0.5)
    assert lut[k0 - 1] < 32768 and np.all(lut[k0:] == 32768)
    assert lut[255] == 32768


def test_sigmoid_q_all_inputs_vs_float():
    s = arith.sigmoid_q(ALL16)
    assert s.min() >= 0 and s.max() <= 32768
    err = np.abs(s - 32768 * float_sigmoid(ALL16 / 1024))
    print(f"max error {err.max():.3f} LSB, bound {SIG_BOUND:.3f}")
    assert err.max() <= SIG_BOUND
    assert SIG_BOUND < 3                                  # a few LSBs of Q1.15
    assert np.all(np.diff(s) >= 0)                        # monotone
    assert arith.sigmoid_q(np.array([0]))[0] == 16384


def test_sigmoid_q_symmetry():
    x = np.arange(-32767, 32768, dtype=np.int64)
    assert np.all(arith.sigmoid_q(x) + arith.sigmoid_q(-x) == 32768)
    # -32768 has no int16 negation: |x| is clamped at 16 anyway
    assert arith.sigmoid_q(np.array([-32768]))[0] + arith.sigmoid_q(np.array([32767]))[0] == 32768
    assert arith.sigmoid_q(np.array([32767]))[0] == 32768


def test_sigmoid_q_uses_given_table():
    flat = np.full(256, 20000, dtype=np.uint16)
    assert arith.sigmoid_q(np.array([0, 5000, -5000]), flat).tolist() == [20000, 20000, 32768 - 20000]


def test_silu_q_all_inputs_vs_float():
    y = arith.silu_q(ALL16)
    true = ALL16 * float_sigmoid(ALL16 / 1024)
    # x·σ_q/32768 rounded: |err| <= 1/2 + |x| · SIG_BOUND / 32768
    assert np.all(np.abs(y - true) <= 0.5 + np.abs(ALL16) * SIG_BOUND / 32768)
    assert arith.silu_q(np.array([0]))[0] == 0
    assert abs(int(y.min()) - (-0.2784645 * 1024)) <= 1    # min of silu: -0.27846 at x = -1.2785
    assert y.max() <= 32767 and y.min() >= -32768


def test_silu_q_matches_docstring_formula():
    rng = rng_for(71)
    x = rng.integers(-32768, 32768, 2000)
    sig = arith.sigmoid_q(x)
    want = [round_half_up(Fraction(int(a) * int(s), 2 ** 15)) for a, s in zip(x, sig)]
    assert arith.silu_q(x).tolist() == want


# --------------------------------------------------------------------------- MLGRU

def test_forget_gate_without_and_with_zero_lower_bound():
    s = arith.sigmoid_q(ALL16)
    assert np.array_equal(arith.forget_gate(ALL16), s)
    assert np.array_equal(arith.forget_gate(ALL16, np.zeros(ALL16.size, dtype=np.uint16)), s)


def test_forget_gate_lower_bound_near_one():
    s = arith.sigmoid_q(ALL16)
    f = arith.forget_gate(ALL16, np.full(ALL16.size, 32768, dtype=np.uint16))
    assert np.all(f == 32768)
    f = arith.forget_gate(ALL16, np.full(ALL16.size, 32767, dtype=np.uint16))
    # 32767 + round_half_up(σ / 32768): 32768 exactly when σ >= 1/2
    assert np.array_equal(f, np.where(s >= 16384, 32768, 32767))


def test_forget_gate_random_lower_bounds():
    rng = rng_for(73)
    x = rng.integers(-32768, 32768, 4000)
    lb = rng.integers(0, 32769, 4000).astype(np.uint16)
    f = arith.forget_gate(x, lb)
    s = arith.sigmoid_q(x)
    assert np.all(f >= lb) and np.all(f <= 32768)
    want = [int(b) + round_half_up(Fraction((32768 - int(b)) * int(v), 32768)) for b, v in zip(lb, s)]
    assert f.tolist() == want
    true = lb / 32768 + (1 - lb / 32768) * float_sigmoid(x / 1024)
    assert np.all(np.abs(f / 32768 - true) <= (SIG_BOUND + 0.5) / 32768)


def test_mlgru_update_convex_combination():
    rng = rng_for(79)
    n = 20000
    h = rng.integers(-32768, 32768, n)
    i_pre = rng.integers(-32768, 32768, n)
    f = rng.integers(0, 32769, n)
    extremes = np.array([-32768, 32767, 0, 1, -1])
    fx = np.array([0, 1, 16384, 32767, 32768])
    grid = np.array(np.meshgrid(extremes, extremes, fx)).reshape(3, -1)
    h, i_pre, f = (np.concatenate([a, b]) for a, b in zip((h, i_pre, f), grid))
    out = arith.mlgru_update(h, i_pre, f)
    s = arith.silu_q(i_pre)
    lo, hi = np.minimum(h, s), np.maximum(h, s)
    assert np.all((out >= lo) & (out <= hi))
    # the exact formula with Python ints: never beyond int16, so the sat16 never acts
    for j in range(0, h.size, 37):
        want = round_half_up(Fraction(int(f[j]) * int(h[j]) + (32768 - int(f[j])) * int(s[j]), 32768))
        assert int(out[j]) == want and -32768 <= want <= 32767
    assert np.array_equal(arith.mlgru_update(h, i_pre, np.full(h.size, 32768)), h)
    assert np.array_equal(arith.mlgru_update(h, i_pre, np.zeros(h.size, dtype=np.int64)), s)


def test_mlgru_many_tokens_stay_bounded():
    rng = rng_for(83)
    d = 64
    h = np.zeros(d, dtype=np.int64)
    peak_silu = 0
    lb = rng.integers(0, 32769, d)
    for t in range(3000):
        i_pre = rng.integers(-32768, 32768, d)
        if t % 500 < 50:
            i_pre = np.full(d, 32767 if t % 1000 < 500 else -32768)
        f = arith.forget_gate(rng.integers(-32768, 32768, d), lb)
        peak_silu = max(peak_silu, int(np.abs(arith.silu_q(i_pre)).max()))
        h = arith.mlgru_update(h, i_pre, f)
        assert int(np.abs(h).max()) <= peak_silu
        assert h.min() >= -32768 and h.max() <= 32767


@pytest.mark.parametrize("g_frac, o_frac", [(8, 9), (11, 9), (15, 14), (11, 4), (9, 0)])
def test_output_gate(g_frac, o_frac):
    rng = rng_for(89 + g_frac + 16 * o_frac)
    gn = rng.integers(-32768, 32768, 5000) >> int(rng.integers(0, 8))
    h = rng.integers(-32768, 32768, 5000)
    gn[:4], h[:4] = [32767, -32768, 0, 1], [32767, 32767, -32768, -1]
    o = arith.output_gate(gn, g_frac, h, o_frac)
    sh = g_frac + arith.PRE_FRAC - o_frac
    si = arith.silu_q(h)
    want = [clamp16(round_half_up(Fraction(int(a) * int(b), 2 ** sh))) for a, b in zip(gn, si)]
    assert o.tolist() == want
    # float: rms(g)·silu(h) in o_frac units; silu_q error <= 1/2 + |x|·SIG_BOUND/32768 LSB of 2**-10
    true = gn / 2.0 ** g_frac * (h / 1024 * float_sigmoid(h / 1024)) * 2 ** o_frac
    silu_err = (0.5 + np.abs(h) * SIG_BOUND / 32768) / 1024
    bound = 0.5 + np.abs(gn) / 2.0 ** g_frac * silu_err * 2 ** o_frac + 1e-9
    ok = np.abs(true) < 32767 - bound
    assert ok.sum() > 100
    assert np.all(np.abs(o - true)[ok] <= bound[ok])
    assert np.all(np.where(true > 32767 + bound, o == 32767, True))
    assert np.all(np.where(true < -32768 - bound, o == -32768, True))


def test_output_gate_saturates_both_ends():
    o = arith.output_gate(np.array([32767, -32768, 0]), 8, np.array([32767, 32767, 32767]), 9)
    assert o.tolist() == [32767, -32768, 0]


@pytest.mark.parametrize("u_frac", [9, 14, 3])
def test_glu(u_frac):
    rng = rng_for(97 + u_frac)
    gate = rng.integers(-32768, 32768, 5000)
    up = rng.integers(-32768, 32768, 5000) >> int(rng.integers(0, 6))
    u = arith.glu(gate, up, u_frac)
    sh = 2 * arith.PRE_FRAC - u_frac
    want = [clamp16(round_half_up(Fraction(int(a) * int(b), 2 ** sh))) for a, b in zip(arith.silu_q(gate), up)]
    assert u.tolist() == want
    true = gate / 1024 * float_sigmoid(gate / 1024) * up / 1024 * 2 ** u_frac
    bound = 0.5 + (0.5 + np.abs(gate) * SIG_BOUND / 32768) / 1024 * np.abs(up) / 1024 * 2 ** u_frac + 1e-9
    ok = np.abs(true) < 32767 - bound
    assert ok.sum() > 100
    assert np.all(np.abs(u - true)[ok] <= bound[ok])
    assert np.all(np.where(true > 32767 + bound, u == 32767, True))
    assert np.all(np.where(true < -32768 - bound, u == -32768, True))


def test_glu_saturates_both_ends():
    u = arith.glu(np.array([32767, 32767, -32768]), np.array([32767, -32768, 5]), 9)
    assert u.tolist() == [32767, -32768, 0]


def test_residual_add():
    rng = rng_for(107)
    for shift in (0, 1, 2, 5, 14):
        r = rng.integers(-32768, 32768, 3000)
        delta = rng.integers(-32768, 32768, 3000) >> int(rng.integers(0, 4))
        r[:4], delta[:4] = [32767, -32768, 32767, -32768], [32767, -32768, -32768, 32767]
        got = arith.residual_add(r, delta, shift)
        want = [clamp16(round_half_up(Fraction(int(a), 2 ** shift)) + int(b)) for a, b in zip(r, delta)]
        assert got.tolist() == want
    # the value is kept: r / 2**F_in + delta / 2**F_out within half an LSB of the output format
    r = np.array([3, -3, 1, -1, 32767]); delta = np.zeros(5, dtype=np.int64)
    assert arith.residual_add(r, delta, 1).tolist() == [2, -1, 1, 0, 16384]
    assert arith.residual_add(np.array([32767, -32768]), np.array([1, -1]), 0).tolist() == [32767, -32768]


def test_residual_add_never_gains_bits():
    with pytest.raises(ValueError) as exc:
        arith.residual_add(np.array([1]), np.array([1]), -1)
    assert str(exc.value) == "residual formats never gain fractional bits (shift -1)"


# --------------------------------------------------------------------------- ends

def test_embed():
    rng = rng_for(101)
    for shift in (0, 1, 7, 16, 24):
        row = rng.integers(-127, 128, 300).astype(np.int8)
        row[:2] = [127, -127]
        scale = int(rng.integers(0, 65536))
        got = arith.embed(row, scale, shift)
        want = [clamp16(round_half_up(Fraction(int(q) * scale, 2 ** shift))) for q in row]
        assert got.tolist() == want
    assert arith.embed(np.array([127, -127], dtype=np.int8), 65535, 0).tolist() == [32767, -32768]
    assert arith.embed(np.array([1, -1, -3], dtype=np.int8), 1, 1).tolist() == [1, 0, -1]


def test_argmax_ties_and_extremes():
    assert arith.argmax([3, 7, 7, 1]) == 1
    assert arith.argmax([5, 5, 5]) == 0
    assert arith.argmax([-32768, -5, -5, -32768]) == 1
    assert arith.argmax(np.array([-32768, 32767, 32767], dtype=np.int64)) == 1
    assert isinstance(arith.argmax([1, 2]), int)
    rng = rng_for(103)
    for _ in range(200):
        v = rng.integers(-3, 3, int(rng.integers(1, 50))).tolist()
        assert arith.argmax(v) == v.index(max(v))
