"""Golden-model speed on this CPU: the first baseline the board is compared with.

    python bench/golden_speed.py [--model FILE] [--tokens N]

Prints tokens per second of the bit-exact integer golden model (NumPy) and of the float
reference, and the ternary additions per token, so later figures (simulated board, FPGA) can be
set against them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from mmfree.models.golden import IntegerModel
from mmfree.models.reference import FloatModel

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models/shipped/tiny-fortunes/tiny-fortunes.mmf"


def tokens_per_second(step, state, tokens) -> float:
    t0 = time.perf_counter()
    for t in tokens:
        _, state = step(int(t), state)
    return len(tokens) / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="board model file (default: shipped)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per measurement (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements; the best is reported")
    args = parser.parse_args(argv)

    im = IntegerModel.from_file(args.model)
    cfg = im.cfg
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens)
    best_int = max(tokens_per_second(im.step, im.new_state(), tokens) for _ in range(args.repeats))
    rows = [("golden model (integer, NumPy)", best_int)]
    ckpt = Path(args.model).parent
    if (ckpt / "config.json").exists():
        fm = FloatModel.from_checkpoint(ckpt)
        best_float = max(tokens_per_second(fm.step, fm.new_state(), tokens) for _ in range(args.repeats))
        rows.append(("float reference (NumPy float32)", best_float))

    print(f"model {args.model}: d={cfg.d} layers={cfg.n_layers} I={cfg.intermediate_size} "
          f"V={cfg.vocab_size}, {cfg.ternary_weights():,} ternary weights per token")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"numpy {np.__version__}, {args.tokens} tokens, best of {args.repeats}")
    for name, tps in rows:
        print(f"  {name:<34} {tps:9.1f} tokens/s   {tps * cfg.ternary_weights() / 1e6:8.2f} M ternary MAC/s")


if __name__ == "__main__":
    main()
