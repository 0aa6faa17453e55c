"""The integer parameters of a model (what a board model file holds) and the converter that
derives them from float weights.

Every number the golden model (golden.py) and the gateware use at run time is here, in the
formats docs/arithmetic.md gives: int8 embeddings with a uint16 scale per row, int16 norm
weights with their fractional bits, ternary weights with their per-tensor γ (kept from the
latent weights, never re-derived from the trits), γ/127 as a 16-bit mantissa and exponent,
the forget-gate lower bounds in Q1.15 and the sigmoid table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import arith
from .config import ModelConfig

__all__ = ["NormParams", "BitLinearParams", "LayerParams", "QuantizedModel", "ConversionError",
           "quantize_model", "DEFAULT_LANES", "PROJECTIONS"]

DEFAULT_LANES = 16          # the iCEBreaker core's lanes (firmware.isa.ICEBREAKER; tests check)
PROJECTIONS = ("i_proj", "f_proj", "g_proj", "o_proj", "gate_proj", "down_proj")


class ConversionError(ValueError):
    """Float weights that cannot be represented in the board formats."""


@dataclass
class NormParams:
    """RMSNorm weight ``w ≈ w_q · 2**-w_frac``; output int16 with ``out_frac`` fractional bits;
    ``eps_q = max(1, round(eps · 4**F_in))`` for its input format."""
    w_q: np.ndarray            # int16 [n]
    w_frac: int
    out_frac: int
    eps_q: int


@dataclass
class BitLinearParams:
    """One BitLinear: its RMSNorm weight ``g ≈ g_q · 2**-g_frac``, trits T [out, in] in
    {-1, 0, 1}, the per-tensor γ (float32, for reference) and ``γ/127 ≈ gamma_mant ·
    2**-gamma_exp``; output int16 with ``out_frac`` fractional bits."""
    g_q: np.ndarray            # int16 [in]
    g_frac: int
    trits: np.ndarray          # int8 [out, in]
    gamma: float
    gamma_mant: int
    gamma_exp: int
    out_frac: int
    eps_q: int

    @property
    def scale_exp(self) -> int:
        """``gamma_exp + g_frac - out_frac``: the constant part of the rescale shift."""
        return self.gamma_exp + self.g_frac - self.out_frac


@dataclass
class LayerParams:
    attn_norm: NormParams
    i_proj: BitLinearParams
    f_proj: BitLinearParams
    g_proj: BitLinearParams
    o_proj: BitLinearParams
    g_norm: NormParams
    lower_bound: np.ndarray | None      # uint16 Q1.15 [d], None for layer 0
    mlp_norm: NormParams
    gate_proj: BitLinearParams          # [2I, d]: rows 0..I-1 gate, I..2I-1 up
    down_proj: BitLinearParams
    o_frac: int                         # format of o = rms(g)·silu(h), the input of o_proj
    u_frac: int                         # format of u = silu(gate)·up, the input of down_proj


@dataclass
class QuantizedModel:
    """All integer parameters of a model. The residual stream is int16 with ``res_fracs[k]``
    fractional bits after stage k (0: embedding; 2l+1: after layer l's token mixer; 2l+2: after
    its channel mixer), non-increasing, because residual magnitudes grow through the network.
    ``formats`` records how they and each layer's o/u formats were chosen."""
    cfg: ModelConfig
    lanes: int
    res_fracs: tuple[int, ...]          # residual stream format after each of the 2L+1 stages
    emb_shift: int
    emb_q: np.ndarray                   # int8 [V, d]
    emb_scale: np.ndarray               # uint16 [V]
    sig_lut: np.ndarray                 # uint16 [256]
    layers: list[LayerParams]
    final_norm: NormParams
    lm_head: BitLinearParams
    name: str = "model"
    source: str = ""
    meta: dict = field(default_factory=dict)

    def norms(self):
        """(name, NormParams) in canonical order."""
        for l, layer in enumerate(self.layers):
            yield f"layers.{l}.attn_norm", layer.attn_norm
            yield f"layers.{l}.g_norm", layer.g_norm
            yield f"layers.{l}.mlp_norm", layer.mlp_norm
        yield "final_norm", self.final_norm

    def bitlinears(self):
        """(name, BitLinearParams) in canonical order."""
        for l, layer in enumerate(self.layers):
            for proj in PROJECTIONS:
                yield f"layers.{l}.{proj}", getattr(layer, proj)
        yield "lm_head", self.lm_head


# --------------------------------------------------------------------------- converter helpers

def _frac_for(max_abs: float, limit: int = 32767, lo: int = 0, hi: int = 24) -> int:
    """Most fractional bits with ``round(max_abs · 2**F) <= limit``, clamped to [lo, hi]."""
    if max_abs <= 0:
        return hi
    f = math.floor(math.log2(limit / max_abs))
    while f > lo and round(max_abs * 2.0 ** f) > limit:
        f -= 1
    return int(min(max(f, lo), hi))


def _fixed(values: np.ndarray, frac: int) -> np.ndarray:
    return np.clip(np.round(values.astype(np.float64) * 2.0 ** frac), -32768, 32767).astype(np.int16)


def _eps_q(eps: float, in_frac: int) -> int:
    return max(1, int(round(eps * 4.0 ** in_frac)))


def _mant_exp16(value: float) -> tuple[int, int]:
    """``value ≈ mant · 2**-exp`` with mant in [2**15, 2**16)."""
    if not (value > 0 and math.isfinite(value)):
        raise ConversionError(f"a scale must be positive and finite, not {value}")
    m, e = math.frexp(value)            # value = m · 2**e, m in [0.5, 1)
    mant, exp = int(round(m * 65536)), 16 - e
    if mant == 65536:
        mant, exp = 32768, exp - 1
    return mant, exp


def make_norm(w: np.ndarray, eps: float, in_frac: int) -> NormParams:
    w = np.asarray(w, dtype=np.float64)
    wmax = float(np.abs(w).max())
    w_frac = _frac_for(wmax, hi=15)
    # |rms(x)_j| <= sqrt(n), so |y| <= sqrt(n)·max|w|: this output format never saturates
    # (1% margin for the truncations of mean and rsqrt).
    out_frac = _frac_for(math.sqrt(w.size) * max(wmax, 2.0 ** -15) * 1.01, hi=15)
    return NormParams(w_q=_fixed(w, w_frac), w_frac=w_frac, out_frac=out_frac,
                      eps_q=_eps_q(eps, in_frac))


def make_bitlinear(trits: np.ndarray, gamma: float, g: np.ndarray, eps: float,
                   in_frac: int, out_frac: int) -> BitLinearParams:
    g = np.asarray(g, dtype=np.float64)
    g_frac = _frac_for(float(np.abs(g).max()))
    mant, exp = _mant_exp16(float(gamma) / arith.ACT_MAX)
    return BitLinearParams(g_q=_fixed(g, g_frac), g_frac=g_frac,
                           trits=np.asarray(trits, dtype=np.int8), gamma=float(gamma),
                           gamma_mant=mant, gamma_exp=exp, out_frac=out_frac,
                           eps_q=_eps_q(eps, in_frac))


def bitlinear_bound_frac(trits: np.ndarray, gamma: float, g: np.ndarray) -> int:
    """Output fractional bits with which a BitLinear can never saturate int16:
    ``|out_i| <= nnz_i · γ · max|y|`` and ``max|y| <= sqrt(n) · max|g|`` (1% margin)."""
    nnz = int(np.abs(np.asarray(trits, dtype=np.int64)).sum(axis=1).max(initial=0))
    g = np.asarray(g, dtype=np.float64)
    bound = max(nnz, 1) * float(gamma) * math.sqrt(g.size) * max(float(np.abs(g).max()), 2.0 ** -15) * 1.01
    return _frac_for(bound, hi=15)


def lower_bounds_q15(lower_bounds: np.ndarray) -> np.ndarray:
    """MODEL.md: softmax over layers, cumsum, minus the first row; as Q1.15 uint16."""
    lb = np.asarray(lower_bounds, dtype=np.float64)
    lb = np.exp(lb - lb.max(axis=0))
    lb = lb / lb.sum(axis=0)
    lb = np.cumsum(lb, axis=0) - lb[0]
    return np.clip(np.round(lb * arith.ONE_Q15), 0, arith.ONE_Q15).astype(np.uint16)


def quantize_embeddings(emb: np.ndarray, res_frac: int) -> tuple[np.ndarray, np.ndarray, int]:
    """int8 rows with a per-row absmax scale: ``e ≈ e_q · scale / 2**(res_frac + emb_shift)``."""
    emb = np.asarray(emb, dtype=np.float64)
    row_max = np.abs(emb).max(axis=1)
    scale = row_max / arith.ACT_MAX
    safe = np.where(scale > 0, scale, 1.0)
    emb_q = np.clip(np.round(emb / safe[:, None]), -127, 127).astype(np.int8)
    top = float(scale.max()) * 2.0 ** res_frac
    emb_shift = _frac_for(top, limit=65535, hi=24) if top > 0 else 0
    emb_scale = np.round(scale * 2.0 ** (res_frac + emb_shift)).astype(np.uint16)
    return emb_q, emb_scale, emb_shift


def snap_embeddings(emb: np.ndarray) -> np.ndarray:
    """The embedding table rounded onto its own int8 per-row grid (float32).

    A checkpoint whose table is snapped loses nothing in :func:`quantize_embeddings`: the
    integer model then sees exactly the float model's embeddings. Training does this as its last
    step (the table is the only full-precision weight the board stores in 8 bits)."""
    emb = np.asarray(emb, dtype=np.float64)
    scale = np.abs(emb).max(axis=1) / arith.ACT_MAX
    safe = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(emb / safe[:, None]), -127, 127) * scale[:, None]).astype(np.float32)


# --------------------------------------------------------------------------- the converter

def quantize_model(cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
                   res_frac: int | list[int] | None = None, o_frac: int | list[int] | None = None,
                   u_frac: int | list[int] | None = None, lanes: int = DEFAULT_LANES,
                   ternary: dict[str, tuple[np.ndarray, float]] | None = None,
                   calibration_tokens=None, name: str = "model", source: str = "") -> QuantizedModel:
    """Float checkpoint tensors → integer parameters.

    ``ternary`` may give (T, γ) per latent weight name for weights that are already ternary
    (never re-derive γ from trits); other weights are ternarized here.

    Formats (fractional bits of int16 vectors): ``res_frac`` for the residual stream, one int
    for every stage or 2L+1 non-increasing values; ``o_frac`` and ``u_frac`` for the inputs of
    o_proj and down_proj, one int or one per layer. What is not given is calibrated: the
    embedding stage gets the most bits its table allows, and every other format the most bits
    that leave 4x headroom over the largest value the golden model itself produces there on
    ``calibration_tokens``.
    """
    from .reference import BITLINEAR_EPS, ternarize   # absmean ternarization exactly as MODEL.md

    if lanes not in (8, 16, 32, 64):
        raise ConversionError(f"lanes must be 8, 16, 32 or 64, not {lanes}")
    eps = cfg.rms_norm_eps              # block norms; BitLinear norms use the kernel's 1e-6
    bl_eps = BITLINEAR_EPS
    ternary = dict(ternary or {})

    def tern(name: str):
        if name in ternary:
            t, gamma = ternary[name]
            return np.asarray(t, dtype=np.int8), float(gamma)
        t, gamma = ternarize(tensors[name])
        return np.asarray(t, dtype=np.int8), float(gamma)

    from .checkpoint import tensor_shapes
    trits = {name: tern(name) for name in tensor_shapes(cfg)
             if name.endswith("_proj.weight") or name == "lm_head.weight"}
    lbs = lower_bounds_q15(tensors["model.lower_bounds"]) if cfg.use_lower_bound else None

    def build(rf: tuple[int, ...], of: tuple[int, ...], uf: tuple[int, ...]) -> QuantizedModel:
        layers = []
        for l in range(cfg.n_layers):
            p = f"model.layers.{l}."
            r_in, r_mid, r_out = rf[2 * l], rf[2 * l + 1], rf[2 * l + 2]
            attn_norm = make_norm(tensors[p + "attn_norm.weight"], eps, r_in)
            projs = {}
            for proj in "ifg":
                t, gamma = trits[p + f"attn.{proj}_proj.weight"]
                g_weight = tensors[p + f"attn.{proj}_proj.norm.weight"]
                # i and f feed the sigmoid table (fixed format); g feeds only g_norm, which is
                # scale invariant, so its format is the one that provably never saturates.
                out_frac = bitlinear_bound_frac(t, gamma, g_weight) if proj == "g" else arith.PRE_FRAC
                projs[proj] = make_bitlinear(t, gamma, g_weight, bl_eps, attn_norm.out_frac, out_frac)
            o_proj = make_bitlinear(*trits[p + "attn.o_proj.weight"],
                                    tensors[p + "attn.o_proj.norm.weight"], bl_eps, of[l], r_mid)
            g_norm = make_norm(tensors[p + "attn.g_norm.weight"], eps, projs["g"].out_frac)
            mlp_norm = make_norm(tensors[p + "mlp_norm.weight"], eps, r_mid)
            gate = make_bitlinear(*trits[p + "mlp.gate_proj.weight"],
                                  tensors[p + "mlp.gate_proj.norm.weight"], bl_eps,
                                  mlp_norm.out_frac, arith.PRE_FRAC)
            down = make_bitlinear(*trits[p + "mlp.down_proj.weight"],
                                  tensors[p + "mlp.down_proj.norm.weight"], bl_eps, uf[l], r_out)
            layers.append(LayerParams(
                attn_norm=attn_norm, i_proj=projs["i"], f_proj=projs["f"], g_proj=projs["g"],
                o_proj=o_proj, g_norm=g_norm,
                lower_bound=None if (lbs is None or l == 0) else lbs[l],
                mlp_norm=mlp_norm, gate_proj=gate, down_proj=down, o_frac=of[l], u_frac=uf[l]))
        final_norm = make_norm(tensors["model.norm.weight"], eps, rf[-1])
        head = make_bitlinear(*trits["lm_head.weight"], tensors["lm_head.norm.weight"], bl_eps,
                              final_norm.out_frac, arith.LOGIT_FRAC)
        emb_q, emb_scale, emb_shift = quantize_embeddings(tensors["model.embeddings.weight"], rf[0])
        return QuantizedModel(cfg=cfg, lanes=lanes, res_fracs=tuple(rf), emb_shift=emb_shift,
                              emb_q=emb_q, emb_scale=emb_scale, sig_lut=arith.sigmoid_lut(),
                              layers=layers, final_norm=final_norm, lm_head=head, name=name,
                              source=source)

    def formats(name: str, value, count: int, monotone: bool = False):
        if value is None:
            return None
        vals = [value] * count if isinstance(value, (int, np.integer)) else list(value)
        if len(vals) != count:
            raise ConversionError(f"{name} needs {count} values, not {len(vals)}")
        for f in vals:
            if not 0 <= f <= 14:
                raise ConversionError(f"{name} must be in [0, 14], not {f}")
        if monotone and any(b > a for a, b in zip(vals, vals[1:])):
            raise ConversionError(f"{name} values must not increase along the network: {vals}")
        return tuple(int(f) for f in vals)

    L = cfg.n_layers
    given = (formats("res_frac", res_frac, 2 * L + 1, monotone=True),
             formats("o_frac", o_frac, L), formats("u_frac", u_frac, L))
    if None not in given:
        return build(*given)
    first = _frac_for(float(np.abs(tensors["model.embeddings.weight"]).max()), hi=14)
    return build(*calibrate_formats(cfg, build, first, given, calibration_tokens))


CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. It is a truth universally acknowledged that a "
    "single model in possession of good weights must be in want of a small board. What is the "
    "answer? 42, said the computer, after 7.5 million years; nobody liked it.\n"
)


def calibration_sequence(vocab_size: int, length: int = 256) -> list[int]:
    """Default calibration input: English text for byte-level models, seeded random ids else."""
    if vocab_size >= 128:
        data = (CALIBRATION_TEXT * (length // len(CALIBRATION_TEXT) + 1)).encode()[:length]
        return list(data)
    return np.random.default_rng(12345).integers(0, vocab_size, size=length).tolist()


def calibrate_formats(cfg: ModelConfig, build, first: int, given, tokens=None,
                      headroom_bits: int = 2) -> tuple[tuple[int, ...], ...]:
    """Choose the formats not ``given`` (res, o, u; None where not given): run the golden model
    with coarse formats and keep ``headroom_bits`` of spare range above the largest value seen
    at each place (residual stages no finer than the stage before)."""
    from .golden import IntegerModel

    tokens = calibration_sequence(cfg.vocab_size) if tokens is None else list(tokens)
    L = cfg.n_layers
    res_given, o_given, u_given = given
    coarse = (res_given or (first,) + (min(first, 2),) * (2 * L),
              o_given or (4,) * L, u_given or (4,) * L)
    peaks = IntegerModel(build(*coarse)).peaks(tokens)

    def fit(name: str, frac: int) -> int:
        peak_real = max(peaks[name], 1) / 2.0 ** frac
        return _frac_for(peak_real * 2 ** headroom_bits, hi=14)

    res = res_given
    if res is None:
        res = [first]
        for k in range(1, 2 * L + 1):
            res.append(min(res[-1], fit(f"r{k}", coarse[0][k])))
    o = o_given or tuple(fit(f"o{l}", coarse[1][l]) for l in range(L))
    u = u_given or tuple(fit(f"u{l}", coarse[2][l]) for l in range(L))
    return tuple(res), tuple(o), tuple(u)
