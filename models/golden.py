"""The integer golden model: the network of MODEL.md in the arithmetic of arith.py.

This is what the accelerator computes, bit for bit. It is built from a
:class:`~mmfree.models.quantized.QuantizedModel` (the contents of a board model file) and runs
one token at a time with its recurrent state (one int16 vector per layer). Logits are int16
with ``arith.LOGIT_FRAC`` fractional bits; :meth:`IntegerModel.dequantize` turns them into
floats for comparisons.
"""

from __future__ import annotations

import numpy as np

from . import arith
from .quantized import BitLinearParams, NormParams, QuantizedModel

__all__ = ["IntegerModel", "bitlinear", "norm"]


def norm(x, p: NormParams) -> np.ndarray:
    """RMSNorm unit: int16 in, int16 out with ``p.out_frac`` fractional bits."""
    return arith.rmsnorm(x, p.w_q, p.w_frac, p.out_frac, p.eps_q)


def bitlinear(x, p: BitLinearParams) -> np.ndarray:
    """BitLinear: norm statistics, int8 quantization, ternary accumulation, rescale.

    int16 ``x`` in (the fractional bits ``p.eps_q`` was made for), int16 out with
    ``p.out_frac`` fractional bits.
    """
    mant, e = arith.norm_stats(x, p.eps_q)
    a, mvn, sh = arith.quantize_activations(x, p.g_q)
    acc = arith.ternary_accumulate(p.trits, a)
    s, z = arith.rescale_factor(mvn, sh, mant, e, p.gamma_mant, p.scale_exp)
    return arith.rescale(acc, s, z)


class IntegerModel:
    """Bit-exact integer inference of a :class:`QuantizedModel`.

    State: a list with one int16 vector h (``arith.PRE_FRAC`` fractional bits) per layer.
    """

    def __init__(self, qm: QuantizedModel):
        self.qm = qm
        self.cfg = qm.cfg
        self.lut = np.asarray(qm.sig_lut, dtype=np.int64)

    @classmethod
    def from_file(cls, path) -> "IntegerModel":
        from .boardfile import read_board_model
        return cls(read_board_model(path))

    # ------------------------------------------------------------------ one token

    def new_state(self) -> list[np.ndarray]:
        return [np.zeros(self.cfg.d, dtype=np.int64) for _ in range(self.cfg.n_layers)]

    def embed(self, token: int) -> np.ndarray:
        if not 0 <= int(token) < self.cfg.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.cfg.vocab_size})")
        qm = self.qm
        return arith.embed(qm.emb_q[token], int(qm.emb_scale[token]), qm.emb_shift)

    def block(self, l: int, r: np.ndarray, h: np.ndarray, probe=None):
        """Layer ``l`` on residual ``r`` (int16, ``res_fracs[2l]``) with state ``h``: (r', h')."""
        p = self.qm.layers[l]
        rf = self.qm.res_fracs
        x = norm(r, p.attn_norm)
        i_pre = bitlinear(x, p.i_proj)
        f_pre = bitlinear(x, p.f_proj)
        g_pre = bitlinear(x, p.g_proj)
        f = arith.forget_gate(f_pre, p.lower_bound, self.lut)
        h = arith.mlgru_update(h, i_pre, f, self.lut)
        o = arith.output_gate(norm(g_pre, p.g_norm), p.g_norm.out_frac, h, p.o_frac, self.lut)
        if probe:
            probe(f"o{l}", o)
        r = arith.residual_add(r, bitlinear(o, p.o_proj), rf[2 * l] - rf[2 * l + 1])
        if probe:
            probe(f"r{2 * l + 1}", r)
        gate_up = bitlinear(norm(r, p.mlp_norm), p.gate_proj)
        inter = self.cfg.intermediate_size
        u = arith.glu(gate_up[:inter], gate_up[inter:], p.u_frac, self.lut)
        if probe:
            probe(f"u{l}", u)
        r = arith.residual_add(r, bitlinear(u, p.down_proj), rf[2 * l + 1] - rf[2 * l + 2])
        if probe:
            probe(f"r{2 * l + 2}", r)
        return r, h

    def step(self, token: int, state: list[np.ndarray], probe=None):
        """Feed one token: returns (int16 logits [V], new state). ``state`` is not modified.
        ``probe(name, vector)``, if given, sees the residual after each stage (``r0`` .. ``r{2L}``)
        and each layer's o and u vectors (``o{l}``, ``u{l}``)."""
        r = self.embed(token)
        if probe:
            probe("r0", r)
        new_state = []
        for l in range(self.cfg.n_layers):
            r, h = self.block(l, r, state[l], probe)
            new_state.append(h)
        logits = bitlinear(norm(r, self.qm.final_norm), self.qm.lm_head)
        return logits, new_state

    # ------------------------------------------------------------------ sequences

    def forward(self, tokens) -> np.ndarray:
        """int16 logits [T, V] after each token, fed one at a time from a zero state."""
        state = self.new_state()
        out = []
        for t in tokens:
            logits, state = self.step(int(t), state)
            out.append(logits)
        return np.array(out, dtype=np.int64).reshape(len(out), self.cfg.vocab_size)

    def peaks(self, tokens) -> dict[str, int]:
        """Largest |value| of every probed vector (see :meth:`step`) while running ``tokens``;
        the converter calibrates formats with it."""
        state, peaks = self.new_state(), {}

        def probe(name, vector):
            peaks[name] = max(peaks.get(name, 0), int(np.abs(vector).max()))

        for t in tokens:
            _, state = self.step(int(t), state, probe)
        return peaks

    @staticmethod
    def dequantize(logits) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64) / (1 << arith.LOGIT_FRAC)
