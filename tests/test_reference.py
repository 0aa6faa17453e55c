"""Tests of the float reference (models/reference.py) and of the checkpoint files it loads.

The reference is checked against ``PyModel`` below: a second, deliberately plain implementation
of MODEL.md (Python floats = float64, one element at a time, nothing shared with
reference.py), on checkpoints written by ``save_checkpoint`` with random weights.
"""

import json
import math

import numpy as np
import pytest

from mmfree.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mmfree.models.config import ModelConfig
from conftest import random_tensors as shared_random_tensors
from mmfree.models.reference import (FloatModel, bitlinear, lower_bounds, projection_names,
                                     quantize_activations, ternarize, ternary_linear)


# --- an independent plain-Python model, written from MODEL.md's pseudo-code -----------------

def py_rms(x, w, eps):
    ms = sum(v * v for v in x) / len(x)
    r = 1.0 / math.sqrt(ms + eps)
    return [v * r * wi for v, wi in zip(x, w)]


def py_sigmoid(v):
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def py_silu(v):
    return v * py_sigmoid(v)


def py_clamp(v, lo, hi):
    return min(max(v, lo), hi)


class PyBitLinear:
    """BitLinear of MODEL.md; Python's round() is round-half-to-even."""

    def __init__(self, W, g):
        rows = W.tolist()
        n = sum(len(row) for row in rows)
        self.gamma = max(sum(abs(w) for row in rows for w in row) / n, 1e-5)
        self.T = [[py_clamp(round(w / self.gamma), -1, 1) for w in row] for row in rows]
        self.g = g.tolist()

    def __call__(self, x):
        y = py_rms(x, self.g, 1e-6)                 # BitLinear eps: 1e-6, the fused kernel's
        s = 127 / max(max(abs(v) for v in y), 1e-5)
        A = [py_clamp(round(v * s), -128, 127) for v in y]
        return [sum(a * t for a, t in zip(A, row)) * self.gamma / s for row in self.T]


class PyModel:
    def __init__(self, cfg, t):
        self.cfg = cfg
        L, d = cfg.n_layers, cfg.d

        def bl(name):
            return PyBitLinear(t[name + ".weight"], t[name + ".norm.weight"])

        self.emb = t["model.embeddings.weight"].tolist()
        self.lb = None
        if cfg.use_lower_bound:
            raw = t["model.lower_bounds"].tolist()
            self.lb = [[0.0] * d for _ in range(L)]
            for j in range(d):
                col = [raw[l][j] for l in range(L)]
                m = max(col)
                e = [math.exp(v - m) for v in col]
                p = [v / sum(e) for v in e]
                for l in range(L):
                    self.lb[l][j] = sum(p[:l + 1]) - p[0]
        self.layers = []
        for l in range(L):
            p = f"model.layers.{l}."
            self.layers.append(dict(
                attn_norm=t[p + "attn_norm.weight"].tolist(), g_norm=t[p + "attn.g_norm.weight"].tolist(),
                mlp_norm=t[p + "mlp_norm.weight"].tolist(),
                i=bl(p + "attn.i_proj"), f=bl(p + "attn.f_proj"), g=bl(p + "attn.g_proj"),
                o=bl(p + "attn.o_proj"), gate=bl(p + "mlp.gate_proj"), down=bl(p + "mlp.down_proj")))
        self.norm = t["model.norm.weight"].tolist()
        self.head = bl("lm_head")

    def forward(self, tokens):
        eps, I = self.cfg.rms_norm_eps, self.cfg.intermediate_size
        h = [[0.0] * self.cfg.d for _ in self.layers]
        out = []
        for tok in tokens:
            x_in = list(self.emb[tok])
            for l, ly in enumerate(self.layers):
                r = x_in
                x = py_rms(x_in, ly["attn_norm"], eps)
                i = ly["i"](x)
                f = [py_sigmoid(v) for v in ly["f"](x)]
                if self.lb is not None and l > 0:
                    f = [lb + (1 - lb) * fv for lb, fv in zip(self.lb[l], f)]
                i = [py_silu(iv) * (1 - fv) for iv, fv in zip(i, f)]
                h[l] = [fv * hv + iv for fv, hv, iv in zip(f, h[l], i)]
                g = ly["g"](x)
                o = [a * hv * py_sigmoid(hv) for a, hv in zip(py_rms(g, ly["g_norm"], eps), h[l])]
                r = [a + b for a, b in zip(r, ly["o"](o))]
                x2 = py_rms(r, ly["mlp_norm"], eps)
                gu = ly["gate"](x2)
                gate, up = gu[:I], gu[I:]
                x_in = [a + b for a, b in zip(r, ly["down"]([py_silu(gv) * uv for gv, uv in zip(gate, up)]))]
            out.append(self.head(py_rms(x_in, self.norm, eps)))
        return np.array(out)


# --- random checkpoints ---------------------------------------------------------------------

def random_tensors(cfg, seed):
    return shared_random_tensors(cfg, seed, norm_sd=0.4, lb_sd=1.5, weight_sd=None)


def make_checkpoint(tmp_path, cfg, seed, dtype="float32", shard_bytes=None, name="ckpt"):
    tensors = random_tensors(cfg, seed)
    return save_checkpoint(tmp_path / name, cfg, tensors, dtype=dtype, shard_bytes=shard_bytes), tensors


# (vocab, d, L, I, eps, use_lower_bound, file dtype, shard_bytes); no d is a multiple of 64
SHAPES = [
    (40, 24, 1, 40, 1e-6, True, "float32", None),
    (97, 40, 2, 56, 1e-5, True, "float16", 4096),
    (300, 70, 3, 48, 1e-6, True, "bfloat16", None),
    (61, 33, 3, 72, 1e-6, False, "bfloat16", 6000),
    (128, 100, 2, 136, 1e-6, True, "float32", 20000),
]


def shape_id(s):
    return f"V{s[0]}-d{s[1]}-L{s[2]}-I{s[3]}-{s[6]}{'-sharded' if s[7] else ''}{'' if s[5] else '-nolb'}"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_independent_model(tmp_path, shape):
    V, d, L, I, eps, use_lb, dtype, shard = shape
    seed = 1000 + d
    print(f"seed {seed}")
    cfg = ModelConfig(V, d, L, I, rms_norm_eps=eps, use_lower_bound=use_lb)
    directory, _ = make_checkpoint(tmp_path, cfg, seed, dtype, shard)
    if shard:
        assert (directory / "model.safetensors.index.json").exists()
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    cfg2, tensors = load_checkpoint(directory)
    assert cfg2 == cfg
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in rng.integers(0, V, 4)] + [V - 1, 0]
    want = PyModel(cfg, tensors).forward(tokens)
    scale = np.abs(want).max()

    got64 = FloatModel.from_checkpoint(directory, dtype=np.float64).forward(tokens)
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, want, rtol=1e-9, atol=1e-9 * scale)

    got32 = FloatModel.from_checkpoint(directory).forward(tokens)
    assert got32.dtype == np.float32
    # float32 rounding may (rarely, and depending on the platform's summation order) move one
    # activation across a rounding boundary: a 1-LSB change of one int8 value, measured at up to
    # ~2% of the largest logit for these shapes. Without such a flip the error is ~1e-7; the
    # tight check is the float64 one above.
    np.testing.assert_allclose(got32, want, rtol=0, atol=5e-2 * scale)


def test_file_dtypes_round_as_documented(tmp_path):
    cfg = ModelConfig(40, 24, 1, 40)
    for dtype in ("float32", "float16", "bfloat16"):
        directory, tensors = make_checkpoint(tmp_path, cfg, 7, dtype, name=dtype)
        _, loaded = load_checkpoint(directory)
        for name, a in tensors.items():
            if dtype == "float32":
                want = a
            elif dtype == "float16":
                want = a.astype(np.float16).astype(np.float32)
            else:                                    # bf16: nearest-even to 8 significand bits
                m, e = np.frexp(a.astype(np.float64))
                want = (np.round(m * 256) / 256 * 2.0 ** e).astype(np.float32)
            assert loaded[name].dtype == np.float32
            np.testing.assert_array_equal(loaded[name], want, err_msg=f"{dtype} {name}")


# --- quantizers ------------------------------------------------------------------------------

def test_quantize_absmax_maps_to_127():
    y = np.array([0.3, -2.0, 1.1, 0.0], dtype=np.float32)
    A, s = quantize_activations(y)
    assert A.dtype == np.int8 and A[1] == -127
    assert s == np.float32(127) / np.float32(2.0)
    A, _ = quantize_activations(-y)
    assert A[1] == 127


def test_quantize_ties_round_half_to_even():
    y = np.array([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5])
    A, s = quantize_activations(y)
    assert s == 1.0
    assert A.tolist() == [127, 2, 4, -2, -4, 0, 2, 0]


def test_quantize_zero_vector():
    for dtype in (np.float32, np.float64):
        A, s = quantize_activations(np.zeros(9, dtype=dtype))
        assert np.all(A == 0) and np.isfinite(s) and s == dtype(127) / dtype(1e-5)
        out = bitlinear(np.zeros(9, dtype=dtype), np.ones((4, 9), dtype=dtype), np.ones(9, dtype=dtype))
        assert np.all(out == 0) and not np.any(np.isnan(out))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_never_minus_128(dtype):
    seed = 4242
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    top = 37 if dtype == np.float32 else 300
    y = rng.normal(size=(4000, 37)) * 10.0 ** rng.uniform(-top, top, size=(4000, 1))
    y[::7, 3] = -np.abs(y[::7]).max(axis=1) * 1.0000001          # negative extreme element
    y[::11] = np.sign(y[::11])                                     # all +-1: every |y| is max
    y[5] = np.finfo(dtype).tiny / 4                                # subnormals
    y[6] = -np.finfo(dtype).max
    y[6, ::2] = np.finfo(dtype).max
    y = y.astype(dtype)
    A, s = quantize_activations(y)
    assert A.min() >= -127 and A.max() <= 127
    m = np.abs(y).max(axis=1)
    big = m >= 1e-5
    at_max = A[np.arange(len(y)), np.abs(y).argmax(axis=1)]
    assert np.all(np.abs(at_max[big]) == 127)
    assert np.all(np.abs(A[5]) == 0)                               # below the 1e-5 floor


def test_ternarize_latent():
    W = np.array([[0.5, -0.1, 0.0], [-0.9, 0.25, 0.35]], dtype=np.float32)
    T, gamma = ternarize(W)
    assert gamma == np.mean(np.abs(W))                             # ~0.35
    assert T.dtype == np.int8
    assert T.tolist() == [[1, 0, 0], [-1, 1, 1]]                   # 0.25/0.35 rounds up, 0.1/0.35 down
    T, gamma = ternarize(np.zeros((3, 4)))
    assert gamma == 1e-5 and np.all(T == 0)


def test_already_ternary_weights_keep_their_gamma():
    rng = np.random.default_rng(11)
    print("seed 11")
    T0 = rng.integers(-1, 2, size=(30, 20)).astype(np.int8)
    gamma0 = 0.037
    W = gamma0 * T0.astype(np.float64)
    nonzero = np.mean(T0 != 0)
    T, gamma = ternarize(W)                                        # the hazard: re-quantizing
    assert np.array_equal(T, T0)
    assert gamma == pytest.approx(gamma0 * nonzero)
    x, g = rng.normal(size=20), rng.normal(1, 0.3, size=20)
    right = ternary_linear(x, T0, gamma0, g)
    np.testing.assert_allclose(bitlinear(x, W, g), right * nonzero)


def test_model_from_ternary_never_requantizes():
    cfg = ModelConfig(50, 20, 2, 24)
    tensors = random_tensors(cfg, 3)
    latent = FloatModel(cfg, tensors, dtype=np.float64)
    ternary = latent.ternary_weights()
    assert set(ternary) == set(projection_names(cfg))
    for name, (T, gamma) in ternary.items():
        T2, gamma2 = ternarize(tensors[name].astype(np.float64))
        assert np.array_equal(T, T2) and gamma == gamma2
    rest = {k: v for k, v in tensors.items() if k not in ternary}
    tokens = [1, 7, 49, 0]
    want = latent.forward(tokens)
    np.testing.assert_array_equal(FloatModel.from_ternary(cfg, rest, ternary, dtype=np.float64).forward(tokens), want)
    # the same weights handed over as dequantized latents get the wrong gamma
    dequant = dict(tensors, **{k: (g * T).astype(np.float64) for k, (T, g) in ternary.items()})
    assert not np.allclose(FloatModel(cfg, dequant, dtype=np.float64).forward(tokens), want, rtol=1e-3)


def test_ternary_argument_errors():
    cfg = ModelConfig(50, 20, 2, 24)
    tensors = random_tensors(cfg, 3)
    ternary = FloatModel(cfg, tensors).ternary_weights()
    with pytest.raises(ValueError, match=r"from_ternary needs \(T, gamma\) for every projection; missing: lm_head.weight"):
        FloatModel.from_ternary(cfg, tensors, {k: v for k, v in ternary.items() if k != "lm_head.weight"})
    bad = dict(ternary, **{"lm_head.weight": (ternary["lm_head.weight"][0] * 2, 0.1)})
    with pytest.raises(ValueError, match="ternary weight lm_head.weight holds values other than -1, 0 and"):
        FloatModel(cfg, tensors, ternary=bad)
    bad = dict(ternary, **{"lm_head.weight": (ternary["lm_head.weight"][0], 0.0)})
    with pytest.raises(ValueError, match="ternary weight lm_head.weight has scale gamma = 0.0"):
        FloatModel(cfg, tensors, ternary=bad)
    bad = dict(ternary, **{"lm_head.weight": (ternary["lm_head.weight"][0][:, :5], 0.1)})
    with pytest.raises(ValueError, match=r"ternary weight lm_head.weight has shape \[50, 5\], the config implies \[50, 20\]"):
        FloatModel(cfg, tensors, ternary=bad)
    with pytest.raises(ValueError, match="ternary names no projection of this model: model.norm.weight"):
        FloatModel(cfg, tensors, ternary={"model.norm.weight": ternary["lm_head.weight"]})
    with pytest.raises(ValueError, match="tensor model.norm.weight is missing"):
        FloatModel(cfg, {k: v for k, v in tensors.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="dtype must be float32 or float64, not float16"):
        FloatModel(cfg, tensors, dtype=np.float16)


# --- lower bounds ----------------------------------------------------------------------------

def test_lower_bounds_values():
    raw = np.array([[0.0, 2.0, -1.0], [1.0, 0.0, -1.0], [-1.0, 0.5, -1.0]])
    lb = lower_bounds(raw)
    p = np.exp(raw) / np.exp(raw).sum(axis=0)
    assert np.all(lb[0] == 0)                                     # layer 0: no lower bound
    np.testing.assert_allclose(lb[1], p[1], rtol=1e-12)
    np.testing.assert_allclose(lb[2], p[1] + p[2], rtol=1e-12)
    np.testing.assert_allclose(lb[2, 2], 2 / 3, rtol=1e-12)
    assert np.all(lower_bounds(raw.astype(np.float32))[0] == 0)


def test_layer_zero_ignores_lower_bound():
    cfg = ModelConfig(40, 24, 1, 40)                              # one layer: only layer 0
    tensors = random_tensors(cfg, 5)
    other = dict(tensors, **{"model.lower_bounds": tensors["model.lower_bounds"] * -7 + 3})
    tokens = [3, 9, 27]
    np.testing.assert_array_equal(FloatModel(cfg, tensors).forward(tokens), FloatModel(cfg, other).forward(tokens))


def test_use_lower_bound_false():
    on = ModelConfig(40, 24, 2, 40, use_lower_bound=True)
    off = ModelConfig(40, 24, 2, 40, use_lower_bound=False)
    tensors = random_tensors(on, 6)
    rest = {k: v for k, v in tensors.items() if k != "model.lower_bounds"}
    tokens = [3, 9, 27]
    a = FloatModel(off, rest, dtype=np.float64).forward(tokens)   # needs no lower_bounds tensor
    np.testing.assert_allclose(a, PyModel(off, rest).forward(tokens), rtol=1e-9, atol=1e-9 * np.abs(a).max())
    b = FloatModel(on, tensors, dtype=np.float64).forward(tokens)
    assert not np.allclose(a, b)
    # with use_lower_bound False a lower_bounds tensor is ignored, not used
    np.testing.assert_array_equal(FloatModel(off, tensors, dtype=np.float64).forward(tokens), a)


# --- state -----------------------------------------------------------------------------------

def test_state_carried_across_tokens():
    cfg = ModelConfig(60, 30, 2, 40)
    model = FloatModel(cfg, random_tensors(cfg, 8))
    state = model.new_state()
    assert len(state) == 2 and all(h.shape == (30,) and not h.any() for h in state)
    l1, s1 = model.step(5, state)
    assert all(not h.any() for h in state)                        # caller's state untouched
    l2, s2 = model.step(17, s1)
    assert any(h.any() for h in s1)
    np.testing.assert_array_equal(np.stack([l1, l2]), model.forward([5, 17]))
    l2_fresh, _ = model.step(17, model.new_state())
    assert not np.allclose(l2, l2_fresh)                          # the state matters
    np.testing.assert_array_equal(model.step(17, s1)[0], l2)      # and step is repeatable
    assert model.forward([]).shape == (0, 60)


def test_state_errors():
    cfg = ModelConfig(60, 30, 2, 40)
    model = FloatModel(cfg, random_tensors(cfg, 8))
    with pytest.raises(ValueError, match=r"state must be 2 vectors of 30 values; start from new_state\(\)"):
        model.step(1, model.new_state()[:1])


@pytest.mark.parametrize("bad", [-1, 60, 1000])
def test_token_out_of_range(bad):
    cfg = ModelConfig(60, 30, 1, 40)
    model = FloatModel(cfg, random_tensors(cfg, 9))
    with pytest.raises(ValueError, match=rf"token id {bad} is out of range for a vocabulary of 60 tokens \(0..59\)"):
        model.step(bad, model.new_state())
    with pytest.raises(ValueError, match="out of range"):
        model.forward([0, bad])


def test_token_not_integer():
    cfg = ModelConfig(60, 30, 1, 40)
    model = FloatModel(cfg, random_tensors(cfg, 9))
    with pytest.raises(ValueError, match="token id must be an integer, not 1.5"):
        model.step(1.5, model.new_state())
    model.step(np.int64(59), model.new_state())                   # NumPy integers are fine


# --- checkpoint loader errors ----------------------------------------------------------------

def _rewrite(directory, change):
    from safetensors.numpy import load_file, save_file
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_checkpoint_missing_tensor(tmp_path):
    directory, _ = make_checkpoint(tmp_path, ModelConfig(40, 24, 1, 40), 1)
    _rewrite(directory, lambda t: t.pop("model.layers.0.attn.g_norm.weight"))
    with pytest.raises(CheckpointError, match="lacks tensor model.layers.0.attn.g_norm.weight"):
        load_checkpoint(directory)


def test_checkpoint_wrong_shape(tmp_path):
    directory, _ = make_checkpoint(tmp_path, ModelConfig(40, 24, 1, 40), 1)
    _rewrite(directory, lambda t: t.update({"lm_head.weight": np.zeros((40, 23), np.float32)}))
    with pytest.raises(CheckpointError, match=r"checkpoint tensor lm_head.weight has shape \[40, 23\], "
                                              r"config.json implies \[40, 24\]"):
        load_checkpoint(directory)


def test_checkpoint_no_safetensors(tmp_path):
    directory, _ = make_checkpoint(tmp_path, ModelConfig(40, 24, 1, 40), 1)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        FloatModel.from_checkpoint(directory)
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("patch, message", [
    ({"hidden_size": 0}, "config field hidden_size must be a positive integer, not 0"),
    ({"hidden_size": "24", "intermediate_size": None}, "config field hidden_size must be a positive integer, not '24'"),
    ({"vocab_size": None}, "config field vocab_size must be a positive integer, not None"),
    ({"rms_norm_eps": "tiny"}, "config field rms_norm_eps must be a positive number, not 'tiny'"),
    ({"use_lower_bound": "false"}, "config field use_lower_bound must be true or false, not 'false'"),
    ({"num_heads": 4}, "config.json has num_heads = 4; only 1 is supported"),
    ({"use_short_conv": True}, "config.json has use_short_conv = True; only False is supported"),
    ({"model_type": "llama"}, "config.json has model_type 'llama'; only 'hgrn_bit' is supported"),
])
def test_checkpoint_bad_config(tmp_path, patch, message):
    directory, _ = make_checkpoint(tmp_path, ModelConfig(40, 24, 1, 40), 1)
    raw = json.loads((directory / "config.json").read_text())
    raw.update(patch)
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory)


def test_checkpoint_missing_config_field(tmp_path):
    directory, _ = make_checkpoint(tmp_path, ModelConfig(40, 24, 1, 40), 1)
    raw = json.loads((directory / "config.json").read_text())
    del raw["num_hidden_layers"]
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="config.json has no field 'num_hidden_layers'"):
        load_checkpoint(directory)


# --- our bf16 files are standard -------------------------------------------------------------

@pytest.mark.parametrize("shard_bytes", [None, 3000])
def test_bf16_files_read_by_torch(tmp_path, shard_bytes):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    cfg = ModelConfig(45, 26, 2, 30)
    directory, tensors = make_checkpoint(tmp_path, cfg, 12, "bfloat16", shard_bytes)
    _, ours = load_checkpoint(directory)
    theirs = {}
    for path in sorted(directory.glob("*.safetensors")):
        theirs.update(load_file(str(path)))
    assert set(theirs) == set(tensors)
    for name, a in tensors.items():
        t = theirs[name]
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == a.shape
        np.testing.assert_array_equal(t.float().numpy(), ours[name], err_msg=name)
        # and the rounding is torch's own float32 -> bfloat16 conversion
        np.testing.assert_array_equal(torch.from_numpy(a).to(torch.bfloat16).float().numpy(), ours[name],
                                      err_msg=name)
