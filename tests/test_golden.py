"""Tests of the integer golden model (models/golden.py) and of the converter (models/quantized.py)
against the float reference (models/reference.py) on random float checkpoints.

Fidelity bound: measured first on these random models (max |logit error| at most ~4% of the
largest |logit|, mean error ~3% of the mean |logit|, top-1 agreement ~97% on flat logits), then
set with about 2x margin; ``test_fidelity_bound_catches_broken_arithmetic`` shows that the bound
rejects golden models with a one-bit error in a shift that matters (the scale of every BitLinear
input cancels in its RMSNorm, so shifts there are invisible by design and not used as mutants).
"""

import math

import numpy as np
import pytest

from mmfree.models import arith, golden
from mmfree.models.boardfile import board_model_bytes
from mmfree.models.config import ModelConfig
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import ConversionError, quantize_model
from mmfree.models.reference import FloatModel, projection_names, ternarize


MAX_REL_ERR = 0.08          # max |logit error| / max |float logit|, per model
MEAN_REL_ERR = 0.05         # mean |logit error| / mean |float logit|, pooled
TOP1_MIN = 0.90             # pooled top-1 agreement

# (V, d, L, I, use_lower_bound): d not a multiple of 32
SHAPES = [(40, 40, 1, 64, True), (256, 72, 2, 96, True), (100, 40, 3, 48, True),
          (200, 72, 3, 200, True), (64, 72, 2, 24, False)]
N_TOKENS = 32


def tokens_for(V, seed):
    rng = np.random.default_rng(seed)
    return [0, V - 1] + rng.integers(0, V, N_TOKENS - 2).tolist()


@pytest.fixture(scope="module")
def cases(make_tensors):
    out = []
    for V, d, L, I, lb in SHAPES:
        seed = 17 * d + L
        print(f"V{V} d{d} L{L} I{I} lb={lb}: seed {seed}")
        cfg = ModelConfig(V, d, L, I, use_lower_bound=lb)
        tensors = make_tensors(cfg, seed)
        qm = quantize_model(cfg, tensors)
        toks = tokens_for(V, seed)
        lf = FloatModel(cfg, tensors, dtype=np.float64).forward(toks)
        out.append((cfg, tensors, qm, toks, lf))
    return out


def fidelity(cases, int_logits):
    """(max per-model relative max error, pooled mean relative error, pooled top-1)."""
    worst, errs, mags, agree = 0.0, [], [], []
    for (cfg, tensors, qm, toks, lf), li in zip(cases, int_logits):
        err = np.abs(li - lf)
        worst = max(worst, float(err.max() / np.abs(lf).max()))
        errs.append(err.ravel())
        mags.append(np.abs(lf).ravel())
        agree.append(li.argmax(axis=1) == lf.argmax(axis=1))
    mean_rel = float(np.concatenate(errs).mean() / np.concatenate(mags).mean())
    return worst, mean_rel, float(np.concatenate(agree).mean())


def within_bounds(f):
    worst, mean_rel, top1 = f
    return worst <= MAX_REL_ERR and mean_rel <= MEAN_REL_ERR and top1 >= TOP1_MIN


def run_all(cases):
    out = []
    for cfg, tensors, qm, toks, lf in cases:
        m = IntegerModel(qm)
        out.append(m.dequantize(m.forward(toks)))
    return out


def test_integer_logits_track_float_logits(cases):
    f = fidelity(cases, run_all(cases))
    print("max rel %.4f, mean rel %.4f, top-1 %.3f" % f)
    assert within_bounds(f), f


_orig = {name: getattr(arith, name) for name in ("embed", "rescale_factor", "sigmoid_q", "forget_gate")}


def _sig_half(x, lut=None):            # sigmoid input read with one fractional bit too many
    return _orig["sigmoid_q"](np.asarray(x, dtype=np.int64) >> 1, lut)


MUTANTS = {
    "embed shift +1": ("embed", lambda q, s, sh: _orig["embed"](q, s, sh + 1)),
    "rescale shift -1": ("rescale_factor", lambda *a: (lambda s, z: (s, z - 1))(*_orig["rescale_factor"](*a))),
    "rescale shift +1": ("rescale_factor", lambda *a: (lambda s, z: (s, z + 1))(*_orig["rescale_factor"](*a))),
    "sigmoid input shift +1": ("sigmoid_q", _sig_half),
    "lower bound ignored": ("forget_gate", lambda f, lb=None, lut=None: _orig["forget_gate"](f, None, lut)),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_fidelity_bound_catches_broken_arithmetic(cases, monkeypatch, mutant):
    name, fn = MUTANTS[mutant]
    monkeypatch.setattr(arith, name, fn)
    f = fidelity(cases, run_all(cases))
    print(f"{mutant}: max rel %.4f, mean rel %.4f, top-1 %.3f" % f)
    assert not within_bounds(f)


# --------------------------------------------------------------------------- one model, its API

@pytest.fixture(scope="module")
def small(make_tensors):
    cfg = ModelConfig(48, 40, 2, 56)
    tensors = make_tensors(cfg, 4242)
    return cfg, tensors, quantize_model(cfg, tensors, res_frac=10)


def test_step_matches_forward(small):
    cfg, _, qm = small
    m = IntegerModel(qm)
    toks = tokens_for(cfg.vocab_size, 5)
    full = m.forward(toks)
    assert full.shape == (len(toks), cfg.vocab_size)
    assert full.min() >= -32768 and full.max() <= 32767
    state = m.new_state()
    for t, tok in enumerate(toks):
        logits, state = m.step(tok, state)
        assert np.array_equal(logits, full[t])
    # forward of a prefix equals the first rows; an empty sequence gives [0, V]
    assert np.array_equal(m.forward(toks[:5]), full[:5])
    assert m.forward([]).shape == (0, cfg.vocab_size)
    assert np.array_equal(m.dequantize(full), full / 256.0)


def test_state_is_not_mutated(small):
    cfg, _, qm = small
    m = IntegerModel(qm)
    _, state = m.step(3, m.new_state())
    _, state = m.step(7, state)
    before = [h.copy() for h in state]
    logits1, new1 = m.step(11, state)
    assert all(np.array_equal(a, b) for a, b in zip(state, before))
    assert all(n is not s for n, s in zip(new1, state))
    logits2, new2 = m.step(11, state)                  # same input, same state: same result
    assert np.array_equal(logits1, logits2)
    assert all(np.array_equal(a, b) for a, b in zip(new1, new2))


def test_zero_initial_state(small):
    cfg, _, qm = small
    m = IntegerModel(qm)
    state = m.new_state()
    assert len(state) == cfg.n_layers
    for h in state:
        assert h.shape == (cfg.d,) and not h.any()
    toks = [5, 9, 2]
    assert np.array_equal(m.forward(toks)[0], m.step(5, [np.zeros(cfg.d, np.int64)] * cfg.n_layers)[0])
    # the state carries information: after a token it is non-zero and changes the next logits
    _, after = m.step(5, state)
    assert all(h.any() for h in after)
    assert not np.array_equal(m.step(9, after)[0], m.step(9, state)[0])
    for h in after:
        assert h.min() >= -32768 and h.max() <= 32767


@pytest.mark.parametrize("bad", [-1, 48, 1000])
def test_token_out_of_range(small, bad):
    cfg, _, qm = small
    m = IntegerModel(qm)
    with pytest.raises(ValueError) as exc:
        m.step(bad, m.new_state())
    assert str(exc.value) == f"token id {bad} is outside the vocabulary [0, 48)"
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 48\)"):
        m.forward([1, 2, bad])


# --------------------------------------------------------------------------- converter

def test_lower_bounds_converted_as_model_md(small):
    cfg, tensors, qm = small
    raw = tensors["model.lower_bounds"].astype(np.float64)
    L, d = raw.shape
    assert qm.layers[0].lower_bound is None
    for l in range(1, L):
        lb = qm.layers[l].lower_bound
        assert lb.dtype == np.uint16 and lb.shape == (d,)
        for j in range(d):
            col = [float(raw[k, j]) for k in range(L)]
            e = [math.exp(v - max(col)) for v in col]
            p = [v / sum(e) for v in e]
            assert int(lb[j]) == round((sum(p[:l + 1]) - p[0]) * 32768), (l, j)


def test_use_lower_bound_false(make_tensors):
    cfg = ModelConfig(56, 40, 3, 40, use_lower_bound=False)
    tensors = make_tensors(cfg, 99)
    assert "model.lower_bounds" not in tensors
    qm = quantize_model(cfg, tensors, res_frac=10)
    assert all(layer.lower_bound is None for layer in qm.layers)
    toks = tokens_for(56, 99)
    lf = FloatModel(cfg, tensors, dtype=np.float64).forward(toks)
    m = IntegerModel(qm)
    li = m.dequantize(m.forward(toks))
    assert np.abs(li - lf).max() <= MAX_REL_ERR * np.abs(lf).max()


def most_bits(bound: float, hi: int) -> int:
    """Most fractional bits F <= hi with round(bound · 2**F) <= 32767 (for bound < 32767)."""
    f = hi
    while f > 0 and bound * 2.0 ** f > 32767.5:
        f -= 1
    return f


def test_formats_and_eps_constants(make_tensors):
    """docs/arithmetic.md: block norms use rms_norm_eps with the F of the residual stage they
    read, g_norm the g projection's format; BitLinear norms the fused kernel's 1e-6 with their
    input's F; every eps as max(1, round(eps · 4**F))."""
    cfg = ModelConfig(40, 40, 2, 48, rms_norm_eps=1e-5)
    tensors = make_tensors(cfg, 3)
    rf = (11, 10, 10, 9, 9)
    qm = quantize_model(cfg, tensors, res_frac=list(rf), o_frac=12, u_frac=[13, 12])
    assert qm.res_fracs == rf
    q = lambda eps, f: max(1, round(eps * 4 ** f))
    for l, layer in enumerate(qm.layers):
        assert (layer.o_frac, layer.u_frac) == (12, (13, 12)[l])
        assert layer.attn_norm.eps_q == q(1e-5, rf[2 * l])
        assert layer.mlp_norm.eps_q == q(1e-5, rf[2 * l + 1])
        assert layer.g_norm.eps_q == q(1e-5, layer.g_proj.out_frac)
        for p, in_frac, out_frac in (
                (layer.i_proj, layer.attn_norm.out_frac, arith.PRE_FRAC),
                (layer.f_proj, layer.attn_norm.out_frac, arith.PRE_FRAC),
                (layer.g_proj, layer.attn_norm.out_frac, layer.g_proj.out_frac),
                (layer.o_proj, layer.o_frac, rf[2 * l + 1]),
                (layer.gate_proj, layer.mlp_norm.out_frac, arith.PRE_FRAC),
                (layer.down_proj, layer.u_frac, rf[2 * l + 2])):
            assert p.eps_q == q(1e-6, in_frac)
            assert p.out_frac == out_frac
        # g projection: the most bits with max_i nnz_i · γ · sqrt(n) · max|g| · 1.01 <= 32767
        t, gamma = ternarize(tensors[f"model.layers.{l}.attn.g_proj.weight"])
        g = tensors[f"model.layers.{l}.attn.g_proj.norm.weight"].astype(np.float64)
        nnz = int(np.abs(t.astype(np.int64)).sum(axis=1).max())
        assert layer.g_proj.out_frac == most_bits(nnz * float(gamma) * math.sqrt(40) * np.abs(g).max() * 1.01, 15)
    assert qm.final_norm.eps_q == q(1e-5, rf[-1])
    assert qm.lm_head.eps_q == q(1e-6, qm.final_norm.out_frac) and qm.lm_head.out_frac == arith.LOGIT_FRAC


def test_g_projection_never_saturates(small):
    """|out_i| <= nnz_i · γ · sqrt(n) · max|g| in the g projection's format, also for inputs
    built to drive every activation of row i to ±127 with the signs of its trits."""
    cfg, tensors, qm = small
    rng = np.random.default_rng(19)
    print("seed 19")
    for layer in qm.layers:
        p = layer.g_proj
        g = p.g_q.astype(np.int64)
        nnz = np.abs(p.trits.astype(np.int64)).sum(axis=1)
        bound = nnz * p.gamma * math.sqrt(cfg.d) * np.abs(g).max() / 2.0 ** p.g_frac * 2.0 ** p.out_frac * 1.01
        assert bound.max() <= 32767.5
        inputs = [rng.integers(-32768, 32768, cfg.d) for _ in range(20)]
        for i in range(0, cfg.d, 7):
            mag = np.where(g != 0, (2 ** 14 * np.abs(g[g != 0]).min()) // np.maximum(np.abs(g), 1), 0)
            inputs.append(np.sign(p.trits[i]).astype(np.int64) * np.sign(g) * mag)
        one_hot = np.zeros(cfg.d, dtype=np.int64)
        one_hot[int(np.argmax(np.abs(g)))] = -32768
        inputs.append(one_hot)
        for x in inputs:
            out = golden.bitlinear(x, p)
            assert np.all(np.abs(out) <= bound + 0.5)
            assert out.min() > -32768 and out.max() < 32767


def test_explicit_formats(small):
    cfg, tensors, _ = small
    stages = 2 * cfg.n_layers + 1
    for rf in (0, 7, 14):
        qm = quantize_model(cfg, tensors, res_frac=rf, o_frac=rf, u_frac=rf)
        assert qm.res_fracs == (rf,) * stages
        for layer in qm.layers:
            assert layer.o_proj.out_frac == rf and layer.down_proj.out_frac == rf
            assert layer.o_frac == rf and layer.u_frac == rf
            assert layer.attn_norm.eps_q == max(1, round(cfg.rms_norm_eps * 4 ** rf))
        # embeddings: e ≈ e_q · S / 2**(res_fracs[0] + emb_shift), e_q = round(e / (max|row| / 127)),
        # S = round(max|row| / 127 · 2**(res_fracs[0] + emb_shift)) in uint16
        e = tensors["model.embeddings.weight"].astype(np.float64)
        scale = np.abs(e).max(axis=1, keepdims=True) / 127
        unit = 2.0 ** -(rf + qm.emb_shift)
        assert qm.emb_scale.dtype == np.uint16 and int(qm.emb_scale.max()) >= 2 ** 15
        approx = qm.emb_q * (qm.emb_scale[:, None] * unit)
        assert np.all(np.abs(approx - e) <= scale / 2 + 127 * unit / 2 + 1e-12)
    per_stage = quantize_model(cfg, tensors, res_frac=[12, 11, 11, 10, 10], o_frac=[13, 12], u_frac=11)
    assert per_stage.res_fracs == (12, 11, 11, 10, 10)
    assert [(l.o_frac, l.u_frac) for l in per_stage.layers] == [(13, 11), (12, 11)]
    for kwargs, message in (
            (dict(res_frac=-1), "res_frac must be in [0, 14], not -1"),
            (dict(res_frac=15), "res_frac must be in [0, 14], not 15"),
            (dict(res_frac=[10, 10, 10]), "res_frac needs 5 values, not 3"),
            (dict(res_frac=[10, 11, 11, 11, 11]),
             "res_frac values must not increase along the network: [10, 11, 11, 11, 11]"),
            (dict(res_frac=10, o_frac=15), "o_frac must be in [0, 14], not 15"),
            (dict(res_frac=10, u_frac=[1, 2, 3]), "u_frac needs 2 values, not 3")):
        with pytest.raises(ConversionError) as exc:
            quantize_model(cfg, tensors, **kwargs)
        assert str(exc.value) == message


def test_lanes_argument(small):
    cfg, tensors, _ = small
    with pytest.raises(ConversionError) as exc:
        quantize_model(cfg, tensors, res_frac=10, lanes=12)
    assert str(exc.value) == "lanes must be 8, 16, 32 or 64, not 12"
    assert quantize_model(cfg, tensors, res_frac=10, o_frac=12, u_frac=12, lanes=64).lanes == 64


@pytest.mark.parametrize("emb_scale", [1.0, 300.0])
def test_calibrated_formats_leave_4x_headroom(make_tensors, emb_scale):
    """Calibrated formats: the embedding stage gets the most bits its table allows; every other
    residual stage, o and u the most bits with 4x headroom over the largest value the golden
    model produces there on the calibration tokens (10% tolerance: calibration runs with coarser
    formats), residual stages never finer than the stage before."""
    cfg = ModelConfig(40, 40, 2, 48)
    tensors = make_tensors(cfg, 77)
    tensors["model.embeddings.weight"] = tensors["model.embeddings.weight"] * np.float32(emb_scale)
    toks = tokens_for(40, 77) * 2
    qm = quantize_model(cfg, tensors, calibration_tokens=toks)
    rf = qm.res_fracs
    print(f"calibrated res_fracs {rf}, o {[l.o_frac for l in qm.layers]}, u {[l.u_frac for l in qm.layers]}")
    assert rf[0] == most_bits(float(np.abs(tensors["model.embeddings.weight"]).max()), 14)
    peaks = IntegerModel(qm).peaks(toks)
    assert set(peaks) == {f"r{k}" for k in range(5)} | {"o0", "o1", "u0", "u1"}

    def fits(name, frac, cap):
        assert peaks[name] * 4 <= 32767 * 1.1, name
        if frac < cap:                               # one more bit would break the headroom
            assert peaks[name] * 8 >= 32767 * 0.9, name
    for k in range(1, 5):
        assert rf[k] <= rf[k - 1]
        fits(f"r{k}", rf[k], min(rf[k - 1], 14))
    for l, layer in enumerate(qm.layers):
        fits(f"o{l}", layer.o_frac, 14)
        fits(f"u{l}", layer.u_frac, 14)
    # the explicit formats reproduce the calibrated model exactly
    again = quantize_model(cfg, tensors, res_frac=list(rf), o_frac=[l.o_frac for l in qm.layers],
                           u_frac=[l.u_frac for l in qm.layers])
    assert board_model_bytes(again) == board_model_bytes(qm)


def test_default_calibration_is_deterministic(small):
    cfg, tensors, _ = small
    a = quantize_model(cfg, tensors)
    b = quantize_model(cfg, tensors, calibration_tokens=None)
    assert board_model_bytes(a) == board_model_bytes(b)


def test_ternary_argument_keeps_gamma(small):
    """Export hazard (MODEL.md): (T, γ) passed as they are reproduce the board model converted
    from the latent weights; re-deriving γ from γ·T gives a different model."""
    cfg, tensors, _ = small
    names = projection_names(cfg)
    pairs = {n: ternarize(tensors[n]) for n in names}
    from_latent = quantize_model(cfg, tensors, res_frac=10)
    only_rest = {k: v for k, v in tensors.items() if k not in pairs}
    from_pairs = quantize_model(cfg, only_rest, res_frac=10, ternary=pairs)
    assert board_model_bytes(from_pairs) == board_model_bytes(from_latent)
    bl = dict(from_pairs.bitlinears())
    assert bl["lm_head"].gamma == float(pairs["lm_head.weight"][1])
    assert np.array_equal(bl["lm_head"].trits, pairs["lm_head.weight"][0])
    for (name, p), n in zip(from_pairs.bitlinears(), names):
        T, gamma = pairs[n]
        assert p.gamma == float(gamma)
        # γ/127 ≈ gamma_mant · 2**-gamma_exp, 16-bit mantissa rounded to nearest
        assert 2 ** 15 <= p.gamma_mant < 2 ** 16
        assert abs(p.gamma_mant * 2.0 ** -p.gamma_exp / (float(gamma) / 127) - 1) <= 2 ** -16

    # the hazard: ternarize(γ·T) keeps T but returns γ · (non-zero fraction of T)
    rederived = {n: ternarize(np.float32(g) * T.astype(np.float32)) for n, (T, g) in pairs.items()}
    for n in names:
        assert np.array_equal(rederived[n][0], pairs[n][0])
        frac = np.count_nonzero(pairs[n][0]) / pairs[n][0].size
        assert abs(float(rederived[n][1]) - float(pairs[n][1]) * frac) <= 1e-6 * float(pairs[n][1])
    wrong = quantize_model(cfg, only_rest, res_frac=10, ternary=rederived)
    assert board_model_bytes(wrong) != board_model_bytes(from_latent)
    toks = tokens_for(cfg.vocab_size, 1)
    assert not np.array_equal(IntegerModel(wrong).forward(toks), IntegerModel(from_latent).forward(toks))
