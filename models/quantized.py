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

DEFAULT_LANES = 32          # trits per 64-bit word: four 16-bit SPRAMs read in parallel
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


@dataclass
class QuantizedModel:
    cfg: ModelConfig
    lanes: int
    res_frac: int                       # fractional bits of the int16 residual stream
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


# --------------------------------------------------------------------------- the converter

def quantize_model(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, res_frac: int | None = None,
                   lanes: int = DEFAULT_LANES, ternary: dict[str, tuple[np.ndarray, float]] | None = None,
                   calibration_tokens=None, name: str = "model", source: str = "") -> QuantizedModel:
    """Float checkpoint tensors → integer parameters.

    ``ternary`` may give (T, γ) per latent weight name for weights that are already ternary
    (never re-derive γ from trits); other weights are ternarized here. ``res_frac`` (the
    residual stream's fractional bits) is calibrated on ``calibration_tokens`` with the golden
    model itself when not given: the most bits that leave 4x headroom over the largest residual
    value seen.
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

    lbs = lower_bounds_q15(tensors["model.lower_bounds"]) if cfg.use_lower_bound else None

    def build(rf: int) -> QuantizedModel:
        layers = []
        for l in range(cfg.n_layers):
            p = f"model.layers.{l}."
            attn_norm = make_norm(tensors[p + "attn_norm.weight"], eps, rf)
            projs = {}
            for proj in "ifg":
                projs[proj] = make_bitlinear(*tern(p + f"attn.{proj}_proj.weight"),
                                             tensors[p + f"attn.{proj}_proj.norm.weight"], bl_eps,
                                             attn_norm.out_frac, arith.PRE_FRAC)
            o_proj = make_bitlinear(*tern(p + "attn.o_proj.weight"),
                                    tensors[p + "attn.o_proj.norm.weight"], bl_eps, arith.O_FRAC, rf)
            g_norm = make_norm(tensors[p + "attn.g_norm.weight"], eps, arith.PRE_FRAC)
            mlp_norm = make_norm(tensors[p + "mlp_norm.weight"], eps, rf)
            gate = make_bitlinear(*tern(p + "mlp.gate_proj.weight"),
                                  tensors[p + "mlp.gate_proj.norm.weight"], bl_eps,
                                  mlp_norm.out_frac, arith.PRE_FRAC)
            down = make_bitlinear(*tern(p + "mlp.down_proj.weight"),
                                  tensors[p + "mlp.down_proj.norm.weight"], bl_eps, arith.U_FRAC, rf)
            layers.append(LayerParams(
                attn_norm=attn_norm, i_proj=projs["i"], f_proj=projs["f"], g_proj=projs["g"],
                o_proj=o_proj, g_norm=g_norm,
                lower_bound=None if (lbs is None or l == 0) else lbs[l],
                mlp_norm=mlp_norm, gate_proj=gate, down_proj=down))
        final_norm = make_norm(tensors["model.norm.weight"], eps, rf)
        head = make_bitlinear(*tern("lm_head.weight"), tensors["lm_head.norm.weight"], bl_eps,
                              final_norm.out_frac, arith.LOGIT_FRAC)
        emb_q, emb_scale, emb_shift = quantize_embeddings(tensors["model.embeddings.weight"], rf)
        return QuantizedModel(cfg=cfg, lanes=lanes, res_frac=rf, emb_shift=emb_shift, emb_q=emb_q,
                              emb_scale=emb_scale, sig_lut=arith.sigmoid_lut(), layers=layers,
                              final_norm=final_norm, lm_head=head, name=name, source=source)

    if res_frac is not None:
        if not 0 <= res_frac <= 14:
            raise ConversionError(f"res_frac must be in [0, 14], not {res_frac}")
        return build(res_frac)
    return build(calibrate_res_frac(cfg, build, calibration_tokens))


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


def calibrate_res_frac(cfg: ModelConfig, build, tokens=None, headroom_bits: int = 2) -> int:
    """Run the golden model with a coarse residual format and keep ``headroom_bits`` of spare
    range above the largest residual value seen (embeddings included)."""
    from .golden import IntegerModel

    tokens = calibration_sequence(cfg.vocab_size) if tokens is None else list(tokens)
    rf = 6
    while True:
        model = IntegerModel(build(rf))
        peak = model.residual_peak(tokens)
        if peak < 32767 or rf == 0:
            break
        rf = max(rf - 4, 0)                         # saturated: retry with more range
    peak_real = max(peak, 1) / 2.0 ** rf
    return _frac_for(peak_real * 2 ** headroom_bits, hi=14)
