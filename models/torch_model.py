"""PyTorch HGRN-bit language model for quantization-aware training (MODEL.md, exactly).

This module (with ``train.py``) is the only place that imports torch, an optional extra
(``pip install mmfree-fpga[train]``). Parameter names mirror the Hugging Face checkpoint
names of :func:`mmfree.models.checkpoint.tensor_shapes`, so ``state_dict()`` keys are those
names and :meth:`HGRNBitLM.to_tensors` / :meth:`HGRNBitLM.from_tensors` are plain copies.

Forward values follow MODEL.md's formulas exactly: every BitLinear computes
``(A · Tᵀ) · γ / s`` from the int8 activations ``A`` and ternary weights ``T``; the
straight-through estimator only changes the gradients (those of the reference's
``x + (q(x) - x).detach()``: the gradient of ``linear(A/s, T·γ)`` with the quantizers as
identity). The integer product ``A · Tᵀ`` is exact in float32 and in TF32 (|A| ≤ 127, |T| ≤ 1,
sums below 2^24), so enabling TF32 keeps the forward values.

The recurrence ``h_t = f_t · h_{t-1} + i_t`` runs either as a loop over time
(``scan="sequential"``, the reference order of operations) or as a Hillis-Steele parallel
scan in ``ceil(log2 T)`` element-wise steps (``scan="parallel"``, the default): the same sums
of the same products, associated differently, so the two agree to float32 rounding
(relative differences of ~1e-6).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, tensor_shapes
from .config import ModelConfig

__all__ = ["HGRNBitLM", "BitLinear", "RMSNorm", "ternary_linear", "parallel_scan"]


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps) · weight`` over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms(x, self.weight, self.eps)


class _TernaryLinear(torch.autograd.Function):
    """``(A · Tᵀ) · γ / s`` forward; straight-through gradients of ``linear(A/s, T·γ)``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = 127.0 / y.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        a = torch.round(y * s).clamp(-128, 127)
        gamma = w.abs().mean().clamp(min=1e-5)
        t = torch.round(w / gamma).clamp(-1, 1)
        out = F.linear(a, t) * gamma / s
        ctx.save_for_backward(a.to(torch.int8), s, t.to(torch.int8), gamma)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, s, t, gamma = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = grad @ (t.to(grad.dtype) * gamma)
        if ctx.needs_input_grad[1]:
            yq = a.to(grad.dtype) / s
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ yq.reshape(-1, yq.shape[-1])
        return grad_y, grad_w


def ternary_linear(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """MODEL.md's BitLinear after its RMSNorm: absmax int8 ``y``, absmean ternary ``w``."""
    return _TernaryLinear.apply(y, w)


class BitLinear(nn.Module):
    """RMSNorm (own weight ``norm.weight``) then ternary linear with latent ``weight``."""

    def __init__(self, in_features: int, out_features: int, eps: float):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = RMSNorm(in_features, eps)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(self.norm(x), self.weight)


def parallel_scan(f: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """All ``h_t = f_t · h_{t-1} + i_t`` (``h_{-1} = 0``) along axis 1, Hillis-Steele."""
    a, b = f, i
    T = f.shape[1]
    k = 1
    while k < T:
        b = torch.cat([b[:, :k], torch.addcmul(b[:, k:], a[:, k:], b[:, :-k])], dim=1)
        if 2 * k < T:
            a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return b


def sequential_scan(f: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    h = torch.zeros_like(i[:, 0])
    out = []
    for t in range(f.shape[1]):
        h = f[:, t] * h + i[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


class MLGRU(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, eps = cfg.d, cfg.rms_norm_eps
        self.layer_idx = layer_idx
        self.i_proj = BitLinear(d, d, eps)
        self.f_proj = BitLinear(d, d, eps)
        self.g_proj = BitLinear(d, d, eps)
        self.o_proj = BitLinear(d, d, eps)
        self.g_norm = RMSNorm(d, eps)

    def forward(self, x, lower_bound, h0, scan):
        i = self.i_proj(x)
        f = torch.sigmoid(self.f_proj(x))
        if lower_bound is not None and self.layer_idx > 0:
            f = lower_bound + (1 - lower_bound) * f
        i = F.silu(i) * (1 - f)
        if h0 is not None:      # fold the carried state into the first step
            i = torch.cat([torch.addcmul(i[:, :1], f[:, :1], h0[:, None]), i[:, 1:]], dim=1)
        h = parallel_scan(f, i) if scan == "parallel" else sequential_scan(f, i)
        g = self.g_proj(x)
        o = self.g_norm(g) * h * torch.sigmoid(h)
        return self.o_proj(o), h[:, -1]


class GLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, I, eps = cfg.d, cfg.intermediate_size, cfg.rms_norm_eps
        self.gate_proj = BitLinear(d, 2 * I, eps)
        self.down_proj = BitLinear(I, d, eps)

    def forward(self, x):
        gate, up = self.gate_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d, cfg.rms_norm_eps)
        self.attn = MLGRU(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d, cfg.rms_norm_eps)
        self.mlp = GLU(cfg)

    def forward(self, x, lower_bound, h0, scan):
        mixed, h_last = self.attn(self.attn_norm(x), lower_bound, h0, scan)
        r = x + mixed
        return r + self.mlp(self.mlp_norm(r)), h_last


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d)
        if cfg.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(cfg.n_layers, cfg.d))
        self.layers = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d, cfg.rms_norm_eps)


class HGRNBitLM(nn.Module):
    """The network of MODEL.md. ``forward(tokens[B, T]) -> logits[B, T, V]`` from zero state.

    ``scan`` chooses how the recurrence runs ("parallel" or "sequential"; same values up to
    float32 rounding). Initialization follows the reference: normal(0, 0.02) for every linear
    and the embedding table, o_proj and down_proj then divided by ``sqrt(2 L)``, norm weights
    1, lower bounds 0.
    """

    def __init__(self, cfg: ModelConfig, scan: str = "parallel"):
        super().__init__()
        if scan not in ("parallel", "sequential"):
            raise ValueError(f"scan must be 'parallel' or 'sequential', not {scan!r}")
        self.cfg = cfg
        self.scan = scan
        self.model = _Backbone(cfg)
        self.lm_head = BitLinear(cfg.d, cfg.vocab_size, cfg.rms_norm_eps)
        with torch.no_grad():
            nn.init.normal_(self.model.embeddings.weight, std=0.02)
            for block in self.model.layers:
                block.attn.o_proj.weight /= math.sqrt(2 * cfg.n_layers)
                block.mlp.down_proj.weight /= math.sqrt(2 * cfg.n_layers)

    def lower_bounds(self) -> torch.Tensor | None:
        """Per-layer forget-gate floors ``[L, d]`` (row 0 is 0 and unused), or None."""
        if not self.cfg.use_lower_bound:
            return None
        lb = torch.softmax(self.model.lower_bounds, dim=0)
        return torch.cumsum(lb, dim=0) - lb[0]

    def forward_with_state(self, tokens: torch.Tensor, state: list[torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, T, V]`` and the recurrent state after the last token (``L × [B, d]``),
        starting from ``state`` (zeros when None)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [B, T], not {list(tokens.shape)}")
        x = self.model.embeddings(tokens)
        lbs = self.lower_bounds()
        new_state = []
        for l, block in enumerate(self.model.layers):
            h0 = None if state is None else state[l]
            x, h_last = block(x, None if lbs is None else lbs[l], h0, self.scan)
            new_state.append(h_last)
        x = self.model.norm(x)
        return self.lm_head(x), new_state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_state(tokens)[0]

    # --- checkpoint tensors -------------------------------------------------------------

    def to_tensors(self) -> dict[str, np.ndarray]:
        """All tensors as float32 NumPy arrays under the names of ``tensor_shapes``."""
        params = dict(self.named_parameters())
        return {name: params[name].detach().to("cpu", torch.float32).numpy().copy()
                for name in tensor_shapes(self.cfg)}

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: dict[str, np.ndarray],
                     scan: str = "parallel") -> "HGRNBitLM":
        """A model holding ``tensors`` (names and shapes of ``tensor_shapes(cfg)``)."""
        model = cls(cfg, scan=scan)
        params = dict(model.named_parameters())
        for name, shape in tensor_shapes(cfg).items():
            if name not in tensors:
                raise CheckpointError(f"tensors lack {name}")
            value = np.asarray(tensors[name], dtype=np.float32)
            if value.shape != shape:
                raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, "
                                      f"the config implies {list(shape)}")
            with torch.no_grad():
                params[name].copy_(torch.from_numpy(value))
        return model

    def parameter_counts(self) -> dict[str, int]:
        """Ternary (latent BitLinear) weights and full-precision parameters."""
        ternary = sum(m.weight.numel() for m in self.modules() if isinstance(m, BitLinear))
        total = sum(p.numel() for p in self.parameters())
        return {"ternary": ternary, "float": total - ternary, "total": total}

    @torch.no_grad()
    def generate(self, prompt: bytes, n_bytes: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 stop: bytes | None = None) -> bytes:
        """Continue ``prompt`` (byte-level vocabulary) by ``n_bytes`` bytes, one token at a
        time through the recurrent state. ``temperature`` 0 is greedy. Generation stops early
        once the output ends with ``stop``."""
        device = next(self.parameters()).device
        threads = torch.get_num_threads()
        if device.type == "cpu":    # one token at a time: tiny ops, threads only cost
            torch.set_num_threads(1)
        try:
            return self._generate(prompt, n_bytes, temperature, top_k, generator, stop, device)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, prompt, n_bytes, temperature, top_k, generator, stop, device) -> bytes:
        ids = list(prompt) or [ord("\n")]
        logits, state = self.forward_with_state(torch.tensor([ids], device=device))
        out = bytearray()
        for _ in range(n_bytes):
            last = logits[0, -1].float()
            if temperature <= 0:
                nxt = int(last.argmax())
            else:
                last = last / temperature
                if top_k is not None:
                    kth = torch.topk(last, top_k).values[-1]
                    last = last.masked_fill(last < kth, float("-inf"))
                probs = torch.softmax(last, dim=-1)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            out.append(nxt)
            if stop is not None and out.endswith(stop):
                break
            logits, state = self.forward_with_state(torch.tensor([[nxt]], device=device), state)
        return bytes(out)
