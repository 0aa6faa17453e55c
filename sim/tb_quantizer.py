"""cocotb testbench of :class:`mmfree.hdl.quantizer.Quantizer` (run from tests/test_quantizer.py).

Every activation and the held ``mvn``/``sh`` ports are compared with
``arith.quantize_activations``. :func:`quantizer_cases` (also used by the Amaranth-simulator
tests) makes the vectors: edge cases first, then random ones.
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from amaranth import signed
from cocotb.triggers import RisingEdge

from mmfree.hdl.quantizer import SH_BITS, ActivationBeat, QuantizerBeat
from mmfree.models import arith
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.cocotb_streams import StreamSink, StreamSource, start_and_reset, unpack

__all__ = ["quantizer_cases", "expected_beats", "input_beats"]

I16_MIN, I16_MAX = -(1 << 15), (1 << 15) - 1
EXTREMES = [I16_MIN, I16_MIN + 1, -1, 0, 1, I16_MAX]


def quantizer_cases(rng: random.Random, max_n: int, n_random: int) -> list[tuple[list, list]]:
    """``(x, g)`` int16 vectors of lengths 1..max_n: the edge cases of docs/arithmetic.md's
    quantizer (all-zero, extremes, negative-dominant, ties in the max, sh < 0 and sh > 0) and
    ``n_random`` random ones with random magnitudes (so every sh in [-14, 16] is likely)."""
    def length():
        return rng.choice([1, max_n, rng.randint(1, max_n)])

    def rand(n, bits):
        lim = 1 << bits
        return [max(I16_MIN, min(I16_MAX, rng.randint(-lim, lim))) for _ in range(n)]

    cases = []
    n = length()
    cases.append(([0] * n, rand(n, 15)))                          # all zero: A = 0, mvn = sh = 0
    n = length()
    cases.append((rand(n, 15), [0] * n))
    cases.append(([I16_MIN] * max_n, [I16_MIN] * max_n))         # v = 2**30 everywhere: sh = 16
    cases.append(([I16_MIN], [I16_MAX]))
    cases.append(([1], [1]))                                      # mv = 1: sh = -14
    cases.append(([-1], [1]))
    n = length()
    cases.append(([rng.choice(EXTREMES) for _ in range(n)],
                  [rng.choice(EXTREMES) for _ in range(n)]))
    # negative-dominant: the largest |v| is negative
    n = max(2, length()) if max_n >= 2 else 1
    x, g = rand(n, 12), rand(n, 12)
    k = rng.randrange(n)
    x[k], g[k] = -20000, 30000
    cases.append((x, g))
    # ties in the max with opposite signs (and a smaller rest)
    if max_n >= 3:
        n = max(3, length())
        x, g = rand(n, 8), rand(n, 8)
        i, j = rng.sample(range(n), 2)
        x[i], g[i], x[j], g[j] = 3000, 7, -7, 3000
        cases.append((x, g))
    # exact rounding ties: max|v| = 4·2**k gives mvn = 2**14 and recip = 127·2**9, so
    # vn = ±2**13 lands on A = ±63.5 (round half up: 64 and -63)
    a, b = rng.randint(0, 12), rng.randint(0, 14)
    base = [-2, 4, 2, -1, 3, -4][:max_n]
    cases.append(([v << a for v in base], [1 << b] * len(base)))
    # small products (sh < 0) and one lone nonzero among zeros
    n = length()
    cases.append((rand(n, 5), rand(n, 5)))
    n = length()
    x = [0] * n
    x[rng.randrange(n)] = rng.choice([-3, 3, 17])
    cases.append((x, [rng.randint(1, 5) for _ in range(n)]))
    for _ in range(n_random):
        n = length()
        cases.append((rand(n, rng.randint(0, 15)), rand(n, rng.randint(0, 15))))
    return cases


def expected_beats(cases) -> list[tuple[int, int, int, int]]:
    """``(a, last, mvn, sh)`` for every element of every vector, from arith.quantize_activations."""
    out = []
    for x, g in cases:
        a, mvn, sh = arith.quantize_activations(np.array(x), np.array(g))
        out += [(int(v), int(j == len(x) - 1), int(mvn), int(sh)) for j, v in enumerate(a)]
    return out


def input_beats(cases) -> list[dict]:
    return [{"x": xj, "g": gj, "last": int(j == len(x) - 1)}
            for x, g in cases for j, (xj, gj) in enumerate(zip(x, g))]


# ------------------------------------------------------------------------------- cocotb tests

def _scale_sink(dut, **kwargs) -> StreamSink:
    """A StreamSink that also records the held ``mvn``/``sh`` ports at every transfer."""
    return StreamSink(dut, "o_stream", ActivationBeat(), dut.clk, **kwargs,
                      record=lambda beat: (beat["a"], beat["last"], int(dut.mvn.value),
                                           unpack(signed(SH_BITS), int(dut.sh.value))))


async def _run_cases(dut, idle: float, stall: float, seed_offset: int) -> None:
    params = tb_params()
    seed = params["seed"] + seed_offset
    dut._log.info(f"seed {seed} idle {idle} stall {stall}")
    rng = random.Random(seed)
    await start_and_reset(dut)
    cases = quantizer_cases(rng, params["max_n"], params["n_random"])
    want = expected_beats(cases)
    src = StreamSource(dut, "i_stream", QuantizerBeat(), dut.clk, idle=idle,
                       rng=random.Random(seed + 1))
    snk = _scale_sink(dut, stall=stall, rng=random.Random(seed + 2))
    snk.start()
    await src.send(input_beats(cases))
    got = await snk.wait_for(len(want), timeout_cycles=20 * len(want) + 200 * len(cases))
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"beat {k}: got (a, last, mvn, sh) = {g}, want {w}"
    for _ in range(100):                       # nothing extra comes out
        await RisingEdge(dut.clk)
    assert len(snk.items) == len(want), f"{len(snk.items) - len(want)} extra activations"
    assert src.sent == len(input_beats(cases))


@cocotb.test()
async def quantizer_no_gaps(dut):
    await _run_cases(dut, 0.0, 0.0, 0)


@cocotb.test()
async def quantizer_gaps_and_backpressure(dut):
    await _run_cases(dut, 0.3, 0.4, 100)
