"""Fidelity of the integer golden model against the float reference on held-out text."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["FidelityReport", "measure_fidelity", "TOP1_TARGET", "BPB_TOLERANCE"]

TOP1_TARGET = 0.98          # top-1 next-token agreement, integer vs float
BPB_TOLERANCE = 0.02        # integer bits per byte within 2% of the float model's


def _bits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log2 p(target) per position, from float64 logits [T, V]."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(targets)), targets] / np.log(2)


@dataclass
class FidelityReport:
    tokens: int                 # predicted positions
    chunks: int
    seq_len: int
    float_bpb: float
    int_bpb: float
    top1_agreement: float
    max_logit_error: float
    mean_logit_error: float
    seconds: float

    @property
    def bpb_ratio(self) -> float:
        return self.int_bpb / self.float_bpb

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= TOP1_TARGET and abs(self.bpb_ratio - 1) <= BPB_TOLERANCE

    def format(self, title: str = "") -> str:
        ok = lambda good: "ok" if good else "MISSED"
        rows = [
            ("held-out positions", f"{self.tokens} ({self.chunks} chunks of {self.seq_len} bytes, zero state each)", ""),
            ("bits per byte, float", f"{self.float_bpb:.4f}", ""),
            ("bits per byte, integer", f"{self.int_bpb:.4f}",
             f"{100 * (self.bpb_ratio - 1):+.2f}% (target within ±{100 * BPB_TOLERANCE:.0f}%: "
             f"{ok(abs(self.bpb_ratio - 1) <= BPB_TOLERANCE)})"),
            ("top-1 agreement", f"{100 * self.top1_agreement:.2f}%",
             f"target >= {100 * TOP1_TARGET:.0f}%: {ok(self.top1_agreement >= TOP1_TARGET)}"),
            ("max |logit error|", f"{self.max_logit_error:.4f}", f"mean {self.mean_logit_error:.4f}"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [title] if title else []
        lines += [f"  {a:<{width}}  {b}" + (f"   {c}" if c else "") for a, b, c in rows]
        lines.append(f"  verdict: {'PASS' if self.passed else 'FAIL'} ({self.seconds:.1f} s)")
        return "\n".join(lines)


def measure_fidelity(float_model, int_model, data: bytes, seq_len: int = 256, chunks: int = 32,
                     progress=None) -> FidelityReport:
    """Run both models over ``chunks`` evenly spaced windows of ``seq_len + 1`` bytes of
    ``data``, each from a zero state, and compare next-token predictions. ``progress`` may wrap
    the iteration over windows (a tqdm, say)."""
    if len(data) < seq_len + 1:
        raise ValueError(f"the held-out text has {len(data)} bytes; at least {seq_len + 1} are needed")
    t0 = time.perf_counter()
    starts = np.linspace(0, len(data) - seq_len - 1, chunks).astype(int)
    fb, ib, agree, err = [], [], [], []
    for s in (progress(starts) if progress else starts):
        window = np.frombuffer(data[s:s + seq_len + 1], dtype=np.uint8).astype(np.int64)
        inputs, targets = window[:-1], window[1:]
        lf = np.asarray(float_model.forward(inputs), dtype=np.float64)
        li = int_model.dequantize(int_model.forward(inputs))
        fb.append(_bits(lf, targets))
        ib.append(_bits(li, targets))
        agree.append(lf.argmax(axis=1) == li.argmax(axis=1))
        err.append(np.abs(lf - li))
    err_all = np.concatenate([e.ravel() for e in err])
    return FidelityReport(tokens=int(sum(len(a) for a in agree)), chunks=len(starts), seq_len=seq_len,
                          float_bpb=float(np.concatenate(fb).mean()),
                          int_bpb=float(np.concatenate(ib).mean()),
                          top1_agreement=float(np.concatenate(agree).mean()),
                          max_logit_error=float(err_all.max()), mean_logit_error=float(err_all.mean()),
                          seconds=time.perf_counter() - t0)
