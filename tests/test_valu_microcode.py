"""The v2 core's element ALU microcode (firmware/valu.py) computes every element-wise
macro-op exactly as models/arith.py does: random (seeded) and edge-case vectors."""

import numpy as np
import pytest

from mmfree.firmware.valu import (Base, Mode, Operands, Out, bitlinear_scalars, run_microcode,
                                  valu)
from mmfree.models import arith

SEED = 20261129
EDGE16 = np.array([-32768, -32767, -1, 0, 1, 32767, -16384, 16383, 1023, -1024], np.int64)


def rng_for(request):
    seed = SEED + sum(map(ord, request.node.name))
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def vec(rng, n, scale=None):
    scale = scale or int(rng.choice([64, 2048, 32768]))
    v = rng.integers(-scale, scale, n, dtype=np.int64)
    k = min(n, len(EDGE16))
    v[rng.choice(n, k, replace=False)] = EDGE16[:k]
    return np.clip(v, -32768, 32767)


@pytest.mark.parametrize("trial", range(6))
def test_glu(request, trial):
    rng = rng_for(request)
    n = int(rng.integers(1, 200))
    gate, up = vec(rng, n), vec(rng, n)
    u_frac = int(rng.integers(0, 16))
    s = {Base.OP0: gate.copy(), Base.OP1: up.copy(), Base.DST: np.zeros(n, np.int64)}
    run_microcode("GLU", s, Operands(n=n, op_shift=2 * arith.PRE_FRAC - u_frac))
    assert np.array_equal(s[Base.DST], arith.glu(gate, up, u_frac))


@pytest.mark.parametrize("trial", range(8))
def test_mlgru(request, trial):
    rng = rng_for(request)
    n = int(rng.integers(1, 130))
    i_pre, f_pre, gn, h = vec(rng, n), vec(rng, n), vec(rng, n), vec(rng, n)
    lb = rng.integers(0, 32769, n).astype(np.int64)
    lb[:2] = [0, 32768][:n]
    has_lb = bool(trial % 2)
    g_frac, o_frac = int(rng.integers(0, 16)), int(rng.integers(0, 16))
    s = {Base.OP0: i_pre.copy(), Base.OP1: f_pre.copy(), Base.OP2: gn.copy(),
         Base.DST: np.zeros(n, np.int64)}
    state = h.copy()
    run_microcode("MLGRU", s, Operands(n=n, w=lb, h=state, has_lb=has_lb,
                                       op_shift=g_frac + arith.PRE_FRAC - o_frac))
    f = arith.forget_gate(f_pre, lb if has_lb else None)
    h_new = arith.mlgru_update(h, i_pre, f)
    assert np.array_equal(state, h_new)
    assert np.array_equal(s[Base.DST], arith.output_gate(gn, g_frac, h_new, o_frac))


@pytest.mark.parametrize("trial", range(6))
def test_norm_embed_resadd(request, trial):
    rng = rng_for(request)
    n = int(rng.integers(1, 130))
    x, w = vec(rng, n), vec(rng, n)
    eps_q, fd = int(rng.integers(1, 1 << 20)), int(rng.integers(-15, 16))
    s = {Base.OP0: x.copy(), Base.DST: np.zeros(n, np.int64)}
    run_microcode("NORM", s, Operands(n=n, w=w, eps_q=eps_q, frac_diff=fd))
    assert np.array_equal(s[Base.DST], arith.rmsnorm(x, w, fd, 0, eps_q))

    row = rng.integers(-127, 128, n).astype(np.int64)
    scale, sh = int(rng.integers(0, 65536)), int(rng.integers(0, 25))
    s = {Base.DST: np.zeros(n, np.int64)}
    run_microcode("EMBED", s, Operands(n=n, w=row, scale=scale, op_shift=sh))
    assert np.array_equal(s[Base.DST], arith.embed(row, scale, sh))

    r, delta, shift = vec(rng, n), vec(rng, n), int(rng.integers(0, 16))
    s = {Base.DST: r.copy(), Base.OP0: delta.copy()}
    run_microcode("RESADD", s, Operands(n=n, op_shift=shift))
    assert np.array_equal(s[Base.DST], arith.residual_add(r, delta, shift))


@pytest.mark.parametrize("trial", range(8))
def test_bitlinear(request, trial):
    rng = rng_for(request)
    cols, rows = int(rng.integers(1, 257)), int(rng.integers(1, 80))
    x = vec(rng, cols, scale=[1, 3, 300, 32768][trial % 4])
    if trial == 5:
        x[:] = 0
    g = vec(rng, cols)
    trits = rng.integers(-1, 2, (rows, cols)).astype(np.int64)
    eps_q = int(rng.integers(1, 1 << 16))
    gamma_mant, scale_exp = int(rng.integers(1 << 15, 1 << 16)), int(rng.integers(-128, 128))
    s = {Base.OP0: x.copy(), Base.DST: np.zeros(rows, np.int64)}
    run_microcode("BITLINEAR", s, Operands(n=cols, w=g, eps_q=eps_q, gamma_mant=gamma_mant,
                                           scale_exp=scale_exp, trits=trits, rows=rows))
    mant, e = arith.norm_stats(x, eps_q)
    a, mvn, sh = arith.quantize_activations(x, g)
    assert np.array_equal(s["act"], a)
    sf, z = arith.rescale_factor(mvn, sh, mant, e, gamma_mant, scale_exp)
    expected = arith.rescale(arith.ternary_accumulate(trits, a), sf, z)
    assert np.array_equal(s[Base.DST], expected)


def test_valu_edges():
    # every sigmoid input against arith.sigmoid_q
    xs = np.arange(-32768, 32768, 7)
    assert [valu(int(x), 0, 0, 0, 0, Mode.SIGMOID) for x in xs] == list(arith.sigmoid_q(xs))
    # TRUNC rounds toward zero, ROUND half up, outputs clamp
    assert valu(-5, 1, 1, 0, 1, Mode.TRUNC) == -2 and valu(-5, 1, 1, 0, 1) == -2
    assert valu(-3, 1, 1, 0, 1, Mode.TRUNC) == -1 and valu(-3, 1, 1, 0, 1) == -1
    assert valu(3, 1, 1, 0, 1) == 2 and valu(-65536, 32767, 65535, 0, 0) == -32768
    assert valu(1, 1, 1, -5, 0, out=Out.U16) == 0 and valu(65535, 1, 1, 65535, 0, out=Out.U16) == 65535
    with pytest.raises(ValueError):
        valu(1 << 16, 1, 1, 0, 0)
    assert bitlinear_scalars(0, 40000, 20, 40000, 3).s == 0
