"""Quantization-aware training of a byte-level HGRN-bit model on the fortune-cookie corpus.

    python -m mmfree.models.train --out runs/tiny --steps 2000

Trains :class:`mmfree.models.torch_model.HGRNBitLM` (ternary weights and int8 activations
fake-quantized in every forward pass, straight-through gradients) with AdamW, linear warmup
and cosine decay on random windows of the train split of :mod:`mmfree.models.corpus`. Prints
validation bits per byte, then writes a Hugging Face ``hgrn_bit`` checkpoint (float32
latent weights, as the reference implementation saves them) and ``training.json`` into the
output directory. Needs torch (``pip install mmfree-fpga[train]``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import save_checkpoint
from .config import ModelConfig
from .corpus import CORPUS_NAME, SEPARATOR, CorpusError, corpus_files, load_corpus_array

__all__ = ["main", "build_parser", "evaluate_bpb", "sample"]

LN2 = math.log(2.0)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and options whose default is described in words."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmfree.models.train",
        description="Quantization-aware training (ternary weights, int8 activations) of a "
                    "byte-level HGRN-bit language model on Debian's fortune cookies. Writes "
                    "config.json, model.safetensors (float32) and training.json to --out.",
        formatter_class=_Formatter)
    g = p.add_argument_group("output and data")
    g.add_argument("--out", type=Path, default=Path("runs/tiny-fortunes"),
                   help="output directory for the checkpoint and training.json")
    g.add_argument("--corpus-dir", type=Path, default=None,
                   help="folder of fortune cookie files (default /usr/share/games/fortunes, "
                        "from `apt-get install fortunes fortunes-min`)")
    g = p.add_argument_group("model dimensions (vocabulary: 256 bytes)")
    g.add_argument("--hidden-size", type=int, default=128, help="d, the model width")
    g.add_argument("--layers", type=int, default=2, help="L, the number of blocks")
    g.add_argument("--intermediate-size", type=int, default=192,
                   help="I, the GLU width (gate_proj has 2I outputs)")
    g.add_argument("--no-lower-bound", dest="lower_bound", action="store_false",
                   help="train without the learned forget-gate lower bounds")
    g.add_argument("--rms-norm-eps", type=float, default=1e-6, help="epsilon of every RMSNorm")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="instead of --steps: time the steps and choose (re-estimated every 250 "
                        "steps) how many fit in this many seconds of training, compilation and "
                        "evaluation included; the count is recorded in training.json")
    g.add_argument("--batch", type=int, default=64, help="sequences per step")
    g.add_argument("--seq-len", type=int, default=256, help="bytes per training sequence")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final learning rate as a fraction of --lr (cosine decay)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default: 5%% of --steps, at most 500; 300 with "
                        "--time-budget)")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay of the latent ternary weights (none elsewhere)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialization and batches")
    g = p.add_argument_group("device and evaluation")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cpu")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's choice; 1 is fastest for tiny "
                        "models on a busy machine)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    g.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="disable TF32 matmuls (forward values are exact either way)")
    g.add_argument("--eval-interval", type=int, default=500,
                   help="steps between validation runs (0: only at the end)")
    g.add_argument("--eval-bytes", type=int, default=0,
                   help="bytes of the val split to score (0: all of it, from its start)")
    g.add_argument("--eval-len", type=int, default=None,
                   help="bytes per validation window, each from zero state (default --seq-len)")
    g.add_argument("--eval-batch", type=int, default=256, help="windows per validation batch")
    g.add_argument("--samples", type=int, default=3, help="samples generated at the end")
    g.add_argument("--no-snap-embeddings", dest="snap_embeddings", action="store_false",
                   help="keep the embedding table as trained instead of rounding it onto the int8 "
                        "per-row grid the board stores (the snap costs ~0.1%% bits per byte)")
    g.add_argument("--sample-bytes", type=int, default=200, help="maximum bytes per sample")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    return p


def _lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def evaluate_bpb(model, data: np.ndarray, window: int, batch: int, device) -> float:
    """Mean cross-entropy in bits per byte over ``data``, cut into consecutive windows of
    ``window`` predicted bytes, each window from zero state (every byte but the first scored)."""
    import torch
    import torch.nn.functional as F

    n = (len(data) - 1) // window
    if n < 1:
        raise ValueError(f"validation data of {len(data)} bytes is shorter than one window")
    ids = torch.from_numpy(data[:n * window + 1].astype(np.int64))
    inputs = ids[:-1].view(n, window)
    targets = ids[1:].view(n, window)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(0, n, batch):
            x = inputs[k:k + batch].to(device)
            y = targets[k:k + batch].to(device)
            logits = model(x).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
    model.train(was_training)
    return total / count / LN2


def sample(model, n: int, max_bytes: int, temperature: float, seed: int) -> list[str]:
    """``n`` cookies sampled from the model after the separator, as text."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt = SEPARATOR.lstrip(b"\n")        # "%\n": a new cookie starts
    out = []
    for _ in range(n):
        text = model.generate(prompt, max_bytes, temperature=temperature, generator=gen,
                              stop=SEPARATOR)
        if text.endswith(SEPARATOR):
            text = text[:-len(SEPARATOR)]
        out.append(text.decode("utf-8", errors="replace"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "hidden_size", "layers", "intermediate_size",
                 "eval_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_len is not None and args.eval_len < 1:
        parser.error("--eval-len must be at least 1")
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("error: training needs torch; install it with `pip install torch`", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from .torch_model import HGRNBitLM

    try:
        train_data = load_corpus_array("train", args.corpus_dir)
        val_data = load_corpus_array("val", args.corpus_dir)
        files = [p.name for p in corpus_files(args.corpus_dir)]
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.eval_bytes:
        val_data = val_data[:args.eval_bytes + 1]
    eval_len = args.eval_len or args.seq_len
    if len(train_data) <= args.seq_len + 1:
        print(f"error: --seq-len {args.seq_len} is longer than the train split", file=sys.stderr)
        return 2

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                      intermediate_size=args.intermediate_size, rms_norm_eps=args.rms_norm_eps,
                      use_lower_bound=args.lower_bound)
    model = HGRNBitLM(cfg).to(device)
    counts = model.parameter_counts()
    step_fn = torch.compile(model) if args.compile else model

    decay = [p for n, p in model.named_parameters()
             if n.endswith("proj.weight") or n == "lm_head.weight"]
    no_decay = [p for n, p in model.named_parameters()
                if not (n.endswith("proj.weight") or n == "lm_head.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")

    data = torch.from_numpy(train_data).to(device)
    span = torch.arange(args.seq_len + 1, device=device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_starts = len(train_data) - args.seq_len - 1

    total_steps = args.steps
    timing_steps = 20
    warmup = args.warmup

    def warmup_steps():
        if warmup is not None:
            return warmup
        return 300 if args.time_budget is not None else min(500, max(1, total_steps // 20))

    print(f"device {device}, torch {torch.__version__}; model d={cfg.d} L={cfg.n_layers} "
          f"I={cfg.intermediate_size}: {counts['ternary']:,} ternary + {counts['float']:,} "
          f"float parameters; corpus {len(train_data):,} train / {len(val_data):,} val bytes",
          flush=True)
    history = []
    train_loss_ema = None
    t0 = time.time()
    t_mark, mark_step = t0, 0
    bar = tqdm(total=total_steps, disable=not args.progress, dynamic_ncols=True)
    step = 0
    while step < total_steps:
        if args.time_budget is not None and (step == 5 or (
                step >= mark_step + timing_steps and (step == 5 + timing_steps or step % 250 == 0))):
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            if step > 5:    # re-estimate the steps that fit, from the speed since the last mark
                per_step = (now - t_mark) / (step - mark_step)
                left = args.time_budget - (now - t0)
                total_steps = max(step + 1, step + int(left / per_step / 1.02))
                bar.total = total_steps
                bar.refresh()
                if step == 5 + timing_steps:
                    tqdm.write(f"{per_step * 1e3:.1f} ms/step: about {total_steps} steps fit "
                               f"in {args.time_budget:g} s")
            t_mark, mark_step = now, step
        lr = _lr_at(step, total_steps, warmup_steps(), args.lr, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n_starts, (args.batch,), generator=gen).to(device)
        chunk = data[starts[:, None] + span].long()
        logits = step_fn(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        if step % 10 == 0 or step == total_steps:
            value = loss.item()
            train_loss_ema = value if train_loss_ema is None else 0.9 * train_loss_ema + 0.1 * value
            bar.set_postfix(loss=f"{value:.3f}", bpb=f"{value / LN2:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if args.eval_interval and step % args.eval_interval == 0 and step < total_steps:
            bpb = evaluate_bpb(model, val_data, eval_len, args.eval_batch, device)
            history.append({"step": step, "train_loss": loss.item(), "val_bpb": bpb,
                            "time_s": round(time.time() - t0, 1)})
            tqdm.write(f"step {step}: train loss {loss.item():.4f} "
                       f"({loss.item() / LN2:.3f} bits/byte), val {bpb:.4f} bits/byte")
    bar.close()
    final_loss = loss.item()
    train_time = time.time() - t0
    val_bpb = evaluate_bpb(model, val_data, eval_len, args.eval_batch, device)
    history.append({"step": total_steps, "train_loss": final_loss, "val_bpb": val_bpb,
                    "time_s": round(train_time, 1)})
    print(f"step {total_steps}: train loss {final_loss:.4f} ({final_loss / LN2:.3f} bits/byte), "
          f"validation {val_bpb:.4f} bits per byte", flush=True)

    val_bpb_trained = val_bpb
    if args.snap_embeddings:
        # The board stores the embedding table in int8 rows: snap it so the float checkpoint and
        # the board model hold the same table (see quantized.snap_embeddings).
        from .quantized import snap_embeddings
        with torch.no_grad():
            emb = model.model.embeddings.weight
            emb.copy_(torch.from_numpy(snap_embeddings(emb.detach().cpu().numpy())).to(emb.device))
        val_bpb = evaluate_bpb(model, val_data, eval_len, args.eval_batch, device)
        print(f"embeddings snapped to the int8 grid: validation {val_bpb:.4f} bits per byte", flush=True)

    out = args.out
    save_checkpoint(out, cfg, model.to_tensors(), dtype="float32")
    model.eval()
    samples = sample(model, args.samples, args.sample_bytes, args.temperature, args.seed)
    for k, text in enumerate(samples):
        print(f"--- sample {k + 1} (float model, temperature {args.temperature}) ---\n{text}")
    info = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python -m mmfree.models.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": cfg.to_hf_dict(),
        "parameters": counts,
        "corpus": {"name": CORPUS_NAME, "files": files, "train_bytes": int(len(train_data)),
                   "val_bytes_scored": int((len(val_data) - 1) // eval_len * eval_len)},
        "steps": total_steps,
        "warmup_steps": warmup_steps(),
        "tokens_seen": total_steps * args.batch * args.seq_len,
        "final_train_loss": final_loss,
        "final_train_loss_ema": train_loss_ema,
        "val_bits_per_byte": val_bpb,
        "val_bits_per_byte_before_snap": val_bpb_trained,
        "embeddings_snapped": bool(args.snap_embeddings),
        "eval_window": eval_len,
        "history": history,
        "wall_time_s": round(time.time() - t0, 1),
        "train_time_s": round(train_time, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu ({platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} threads)",
        "torch_version": torch.__version__,
        "samples": {"temperature": args.temperature, "text": samples},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}/config.json, model.safetensors, training.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
