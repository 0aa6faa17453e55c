"""Float reference of the network in MODEL.md, in NumPy, one token at a time.

This is the golden model every other model of the project is checked against: it computes
exactly what MODEL.md writes down (and what the Hugging Face ``hgrn_bit`` code computes), in
float32 by default or float64 on request. The integer cores ``A · Tᵀ`` are exact: they are
sums of small integers, done in float32 only while they cannot exceed 2**24.

Functions (any leading axes, features on the last axis):

- ``rms(x, w, eps)``: ``x · rsqrt(mean(x²) + eps) · w``.
- ``quantize_activations(y) -> (A, s)``: absmax int8, ``A = clamp(round(y·s), -128, 127)``
  with round-half-to-even, ``s = 127 / max(max|y|, 1e-5)``.
- ``ternarize(W) -> (T, gamma)``: ``gamma = max(mean|W|, 1e-5)``, ``T = clamp(round(W/gamma), -1, 1)``.
- ``ternary_linear(x, T, gamma, norm_weight, eps)``: BitLinear from an already ternary ``T``.
- ``bitlinear(x, weight, norm_weight, eps)``: BitLinear from the latent weight.
- ``lower_bounds(raw)``: the forget-gate floors of every layer (row 0 is zero).

``FloatModel`` holds a whole network with every projection ternarized once at load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint, tensor_shapes
from .config import ModelConfig

__all__ = ["BITLINEAR_EPS", "rms", "sigmoid", "silu", "quantize_activations", "ternarize",
           "ternary_linear", "bitlinear", "lower_bounds", "projection_names", "FloatModel"]

#: RMSNorm eps inside every BitLinear. The fused kernel of the reference code uses 1e-6 whatever
#: ``rms_norm_eps`` says (MODEL.md); the other norms (attn_norm, g_norm, mlp_norm, norm) use
#: ``rms_norm_eps``.
BITLINEAR_EPS = 1e-6

_ACT_FLOOR = 1e-5      # floor of max|y| in the activation scale
_GAMMA_FLOOR = 1e-5    # floor of mean|W| in the weight scale


def _float(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def rms(x, w, eps: float) -> np.ndarray:
    """``x · rsqrt(mean(x²) + eps) · w`` over the last axis, in the dtype of ``x``."""
    x = _float(x)
    rstd = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))
    return x * rstd * np.asarray(w, dtype=x.dtype)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):    # exp(-x) may overflow to inf: 1/(1+inf) is the right 0
        return 1 / (1 + np.exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def quantize_activations(y) -> tuple[np.ndarray, np.ndarray]:
    """Absmax int8 quantization of each vector along the last axis.

    Returns ``(A, s)``: ``A`` int8 with the shape of ``y``, ``s`` with the shape of
    ``y.shape[:-1]`` (a scalar for a vector), in the dtype of ``y``, such that ``y ≈ A / s``.
    The largest |element| maps to exactly ±127; ties round half to even; -128 never occurs;
    an all-zero vector gives ``A = 0`` and ``s = 127 / 1e-5``.
    """
    y = _float(y)
    s = y.dtype.type(127) / np.maximum(np.max(np.abs(y), axis=-1), y.dtype.type(_ACT_FLOOR))
    A = np.clip(np.round(y * np.expand_dims(s, -1)), -128, 127).astype(np.int8)
    return A, s


def ternarize(W) -> tuple[np.ndarray, np.floating]:
    """Absmean ternary quantization of a whole latent matrix.

    Returns ``(T, gamma)``: ``T`` int8 in {-1, 0, +1} with the shape of ``W``, ``gamma`` a scalar
    in the dtype of ``W`` with ``W ≈ gamma · T``.

    Only for *latent* weights. A matrix that is already ternary (``gamma · T``) would come back
    with the same ``T`` but ``gamma`` times its non-zero fraction (MODEL.md, export hazard):
    keep the original ``(T, gamma)`` pair instead and pass it to ``ternary_linear`` or to
    ``FloatModel(..., ternary=...)``.
    """
    W = _float(W)
    gamma = np.maximum(np.mean(np.abs(W)), W.dtype.type(_GAMMA_FLOOR))
    T = np.clip(np.round(W / gamma), -1, 1).astype(np.int8)
    return T, gamma


def _core_dtype(in_features: int) -> type:
    """Float type in which ``A · Tᵀ`` over ``in_features`` terms is exact (|sum| <= 127·n)."""
    return np.float32 if 127 * in_features < 2 ** 24 else np.float64


def ternary_linear(x, T, gamma, norm_weight, eps: float = BITLINEAR_EPS) -> np.ndarray:
    """BitLinear with a ternary weight already given: ``(A · Tᵀ) · gamma / s``.

    ``x`` [..., in], ``T`` [out, in] with values in {-1, 0, +1} (any numeric dtype),
    ``gamma`` the scale that goes with ``T``, ``norm_weight`` [in]. Returns [..., out] in the
    dtype of ``x``; ``A`` comes from ``quantize_activations(rms(x, norm_weight, eps))``.
    """
    x = _float(x)
    A, s = quantize_activations(rms(x, norm_weight, eps))
    core = _core_dtype(np.shape(T)[-1])
    acc = A.astype(core) @ np.asarray(T, dtype=core).T            # exact integer sums
    return acc.astype(x.dtype) * x.dtype.type(gamma) / np.expand_dims(s, -1)


def bitlinear(x, weight, norm_weight, eps: float = BITLINEAR_EPS) -> np.ndarray:
    """BitLinear of MODEL.md from the latent weight ``weight`` [out, in] (ternarized here)."""
    T, gamma = ternarize(weight)
    return ternary_linear(x, T, gamma, norm_weight, eps)


def lower_bounds(raw) -> np.ndarray:
    """Forget-gate floors from the parameter ``model.lower_bounds`` [L, d].

    ``softmax`` over layers (axis 0), then ``cumsum(axis=0) - lb[0]``: row 0 is exactly zero
    and row ``l`` is ``p_1 + ... + p_l``, so the floors grow with depth and stay below 1.
    """
    raw = _float(raw)
    e = np.exp(raw - np.max(raw, axis=0, keepdims=True))
    p = e / np.sum(e, axis=0, keepdims=True)
    return np.cumsum(p, axis=0) - p[0]


def projection_names(cfg: ModelConfig) -> list[str]:
    """Names of every ternary weight matrix (the BitLinear ``.weight`` tensors), in model order."""
    names = []
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        names += [p + f"attn.{proj}_proj.weight" for proj in "ifgo"]
        names += [p + "mlp.gate_proj.weight", p + "mlp.down_proj.weight"]
    return names + ["lm_head.weight"]


class _Projection:
    """One BitLinear with its ternary weight prepared for fast per-token use."""

    def __init__(self, T: np.ndarray, gamma, norm_weight: np.ndarray, dtype):
        self.T = np.ascontiguousarray(T, dtype=_core_dtype(T.shape[1]))    # [out, in]
        self.gamma = dtype(gamma)
        self.norm_weight = np.asarray(norm_weight, dtype=dtype)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ternary_linear(x, self.T, self.gamma, self.norm_weight, BITLINEAR_EPS)


class FloatModel:
    """The whole network of MODEL.md, one token at a time with recurrent state.

    ``FloatModel(cfg, tensors, ternary=None, dtype=np.float32)``: ``tensors`` maps the names of
    ``checkpoint.tensor_shapes(cfg)`` to arrays (as ``load_checkpoint`` returns them). Every
    projection is ternarized once here from its latent weight, exactly as the reference code
    does on every call.

    ``ternary`` maps projection weight names (``projection_names(cfg)``, e.g.
    ``"lm_head.weight"``) to ``(T, gamma)`` pairs that are used as they are, never re-quantized:
    use it for weights that are already ternary (a board model, an export), since re-deriving
    ``gamma`` from ``gamma · T`` gives the wrong scale (MODEL.md, export hazard). A latent
    weight named there may be absent from ``tensors``.

    The state is a list of ``L`` vectors ``h_l`` [d]; ``step`` returns a new one and never
    changes the one it is given. All arithmetic is in ``dtype`` (float32 or float64).
    """

    def __init__(self, cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
                 ternary: dict[str, tuple[np.ndarray, float]] | None = None, dtype=np.float32):
        dtype = np.dtype(dtype).type
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, not {np.dtype(dtype).name}")
        ternary = dict(ternary or {})
        shapes = tensor_shapes(cfg)
        unknown = set(ternary) - set(projection_names(cfg))
        if unknown:
            raise ValueError(f"ternary names no projection of this model: {', '.join(sorted(unknown))}")
        for name, shape in shapes.items():
            if name in ternary:
                continue
            if name not in tensors:
                raise ValueError(f"tensor {name} is missing")
            if np.shape(tensors[name]) != shape:
                raise ValueError(f"tensor {name} has shape {list(np.shape(tensors[name]))}, "
                                 f"the config implies {list(shape)}")
        self.cfg = cfg
        self.dtype = dtype

        def proj(name: str) -> _Projection:
            norm = tensors[name[:-len("weight")] + "norm.weight"]
            if name in ternary:
                T, gamma = ternary[name]
                T = np.asarray(T)
                if T.shape != shapes[name]:
                    raise ValueError(f"ternary weight {name} has shape {list(T.shape)}, "
                                     f"the config implies {list(shapes[name])}")
                if not np.all((T == -1) | (T == 0) | (T == 1)):
                    raise ValueError(f"ternary weight {name} holds values other than -1, 0 and +1")
                if not (np.isfinite(gamma) and gamma > 0):
                    raise ValueError(f"ternary weight {name} has scale gamma = {gamma!r}; it must be "
                                     "positive and finite")
            else:
                T, gamma = ternarize(np.asarray(tensors[name], dtype=dtype))
            return _Projection(T, gamma, norm, dtype)

        def vec(name: str) -> np.ndarray:
            return np.asarray(tensors[name], dtype=dtype)

        self.embeddings = vec("model.embeddings.weight")
        self.lower_bounds = lower_bounds(vec("model.lower_bounds")) if cfg.use_lower_bound else None
        self.layers = []
        for l in range(cfg.n_layers):
            p = f"model.layers.{l}."
            layer = {k: proj(p + f"attn.{k}_proj.weight") for k in "ifgo"}
            layer.update(gate=proj(p + "mlp.gate_proj.weight"), down=proj(p + "mlp.down_proj.weight"),
                         attn_norm=vec(p + "attn_norm.weight"), g_norm=vec(p + "attn.g_norm.weight"),
                         mlp_norm=vec(p + "mlp_norm.weight"))
            self.layers.append(layer)
        self.norm = vec("model.norm.weight")
        self.lm_head = proj("lm_head.weight")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, dtype=np.float32) -> "FloatModel":
        """Load a Hugging Face ``hgrn_bit`` checkpoint directory (raises ``CheckpointError``)."""
        cfg, tensors = load_checkpoint(directory)
        return cls(cfg, tensors, dtype=dtype)

    @classmethod
    def from_ternary(cls, cfg: ModelConfig, tensors: dict[str, np.ndarray],
                     ternary: dict[str, tuple[np.ndarray, float]], dtype=np.float32) -> "FloatModel":
        """A model whose every projection is given as ``(T, gamma)``; nothing is re-quantized.

        ``tensors`` needs only the non-projection tensors (embeddings, norms, lower bounds).
        """
        missing = [name for name in projection_names(cfg) if name not in ternary]
        if missing:
            raise ValueError(f"from_ternary needs (T, gamma) for every projection; missing: "
                             f"{', '.join(missing)}")
        return cls(cfg, tensors, ternary=ternary, dtype=dtype)

    def ternary_weights(self) -> dict[str, tuple[np.ndarray, np.floating]]:
        """Every projection's ``(T int8 [out, in], gamma)``, keyed by ``projection_names``."""
        projs = [p for layer in self.layers for p in (layer["i"], layer["f"], layer["g"], layer["o"],
                                                       layer["gate"], layer["down"])]
        projs.append(self.lm_head)
        return {name: (p.T.astype(np.int8), p.gamma)
                for name, p in zip(projection_names(self.cfg), projs)}

    def new_state(self) -> list[np.ndarray]:
        """The state before the first token: ``L`` zero vectors [d]."""
        return [np.zeros(self.cfg.d, dtype=self.dtype) for _ in range(self.cfg.n_layers)]

    def _check_token(self, token_id) -> int:
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise ValueError(f"token id must be an integer, not {token_id!r}")
        if not 0 <= token_id < self.cfg.vocab_size:
            raise ValueError(f"token id {int(token_id)} is out of range for a vocabulary of "
                             f"{self.cfg.vocab_size} tokens (0..{self.cfg.vocab_size - 1})")
        return int(token_id)

    def step(self, token_id: int, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run one token. Returns ``(logits [V], new_state)``; ``state`` is left unchanged."""
        token_id = self._check_token(token_id)
        if len(state) != self.cfg.n_layers or any(np.shape(h) != (self.cfg.d,) for h in state):
            raise ValueError(f"state must be {self.cfg.n_layers} vectors of {self.cfg.d} values; "
                             "start from new_state()")
        eps, I = self.cfg.rms_norm_eps, self.cfg.intermediate_size
        x = self.embeddings[token_id]
        new_state = []
        for l, layer in enumerate(self.layers):
            r = x
            x = rms(r, layer["attn_norm"], eps)
            # token mixer: MLGRU
            i = layer["i"](x)
            f = sigmoid(layer["f"](x))
            if self.lower_bounds is not None and l > 0:
                lb = self.lower_bounds[l]
                f = lb + (1 - lb) * f
            i = silu(i) * (1 - f)
            h = f * np.asarray(state[l], dtype=self.dtype) + i
            new_state.append(h)
            o = rms(layer["g"](x), layer["g_norm"], eps) * h * sigmoid(h)
            r = r + layer["o"](o)
            # channel mixer: GLU
            gate_up = layer["gate"](rms(r, layer["mlp_norm"], eps))
            x = r + layer["down"](silu(gate_up[:I]) * gate_up[I:])
        logits = self.lm_head(rms(x, self.norm, eps))
        return logits, new_state

    def forward(self, tokens) -> np.ndarray:
        """Logits [len(tokens), V] of a sequence fed one token at a time from ``new_state()``."""
        state = self.new_state()
        out = np.zeros((len(tokens), self.cfg.vocab_size), dtype=self.dtype)
        for t, token_id in enumerate(tokens):
            out[t], state = self.step(token_id, state)
        return out
