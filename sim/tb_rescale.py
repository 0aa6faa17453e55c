"""cocotb testbench of :class:`mmfree.hdl.rescale.Rescale` (run from tests/test_rescale.py).

Every output and the ``s``/``z`` observation ports are compared with ``arith.rescale_factor``
and ``arith.rescale``. :func:`rescale_cases` (also used by the Amaranth-simulator tests) makes
the vectors: parameters aimed at every z region (z < -16, z < 0, 0, 1, large, > 62), the port
extremes and mvn = 0, with accumulators at 0, ±1, the width's extremes, around the saturation
thresholds and at random.
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from cocotb.triggers import RisingEdge

from mmfree.hdl.quantizer import SH_BITS
from mmfree.hdl.rescale import (E_BITS, MANT_BITS, SCALE_EXP_BITS, Z_SHAPE, AccBeat,
                                RescaleBeat, RescaleParams)
from mmfree.models import arith
from mmfree.models.arith import QUANT_BITS
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.cocotb_streams import StreamSink, StreamSource, start_and_reset, unpack

__all__ = ["rescale_cases", "expected_outputs", "param_beats", "acc_beats"]

SE_MIN, SE_MAX = -(1 << (SCALE_EXP_BITS - 1)), (1 << (SCALE_EXP_BITS - 1)) - 1
SH_MIN, SH_MAX = -(1 << (SH_BITS - 1)), (1 << (SH_BITS - 1)) - 1
Z_TARGETS = [-200, -40, -17, -16, -15, -9, -1, 0, 1, 2, 5, 16, 31, 40, 47, 61, 62, 63, 90, 200]


def _realistic(rng):
    """Parameters as the network produces them (docs/arithmetic.md ranges)."""
    return {"mvn": rng.randrange(1 << (QUANT_BITS - 1), 1 << QUANT_BITS),
            "sh": rng.randint(-14, 16),
            "mant": rng.randrange(1 << 15, 1 << 16), "e": rng.randint(16, 46),
            "gamma_mant": rng.randrange(1 << 15, 1 << 16), "scale_exp": rng.randint(-20, 20)}


def _anywhere(rng):
    """Any values the ports can carry (the hardware must still agree with rescale_factor)."""
    return {"mvn": rng.randrange(1 << QUANT_BITS), "sh": rng.randint(SH_MIN, SH_MAX),
            "mant": rng.choice([0, 1, rng.randrange(1 << MANT_BITS), (1 << MANT_BITS) - 1]),
            "e": rng.randrange(1 << E_BITS),
            "gamma_mant": rng.choice([0, 1, rng.randrange(1 << MANT_BITS), (1 << MANT_BITS) - 1]),
            "scale_exp": rng.randint(SE_MIN, SE_MAX)}


def _aim(params, z_target):
    """Move scale_exp (within its port range) so that z lands on ``z_target`` if it can."""
    _, z0 = arith.rescale_factor(**{**params, "scale_exp": 0})
    return {**params, "scale_exp": max(SE_MIN, min(SE_MAX, z_target - z0))}


def _edge_accs(acc_width, s, z):
    """0, ±1, the width's extremes and the accumulators around the saturation thresholds
    (acc · S · 2**-z near 2**15 - 1 and -2**15)."""
    lo, hi = -(1 << (acc_width - 1)), (1 << (acc_width - 1)) - 1
    picks = [0, 1, -1, lo, hi, lo + 1, hi - 1]
    if s:
        for bound in (32767, -32768):
            k = int(bound * 2.0 ** max(min(z, 62), -16) / s)
            picks += [c for c in range(k - 2, k + 3) if lo <= c <= hi]
    return picks


def _accs(rng, acc_width, s, z, n):
    lo, hi = -(1 << (acc_width - 1)), (1 << (acc_width - 1)) - 1
    picks = _edge_accs(acc_width, s, z)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(picks))
        elif r < 0.7:
            out.append(rng.randint(lo, hi))
        else:
            out.append(rng.randint(max(lo, -127 * 512), min(hi, 127 * 512)))
    return out


def rescale_cases(rng: random.Random, acc_width: int, n_random: int, max_len: int = 12):
    """``(params, accs)`` per vector: every z target with realistic parameters, mvn = 0,
    the port extremes, then ``n_random`` random vectors."""
    plans = [_aim(_realistic(rng), z) for z in Z_TARGETS]
    plans += [{**_realistic(rng), "mvn": 0}, {**_anywhere(rng), "mvn": 0}]
    plans += [{"mvn": (1 << QUANT_BITS) - 1, "sh": SH_MIN, "mant": (1 << MANT_BITS) - 1,
               "e": (1 << E_BITS) - 1, "gamma_mant": (1 << MANT_BITS) - 1, "scale_exp": SE_MAX},
              {"mvn": 1, "sh": SH_MAX, "mant": 1, "e": 0, "gamma_mant": 1, "scale_exp": SE_MIN}]
    for _ in range(n_random):
        plans.append(_aim(_realistic(rng), rng.randint(-20, 70)) if rng.random() < 0.6
                     else _anywhere(rng))
    cases = []
    for params in plans:
        s, z = arith.rescale_factor(**params)
        n = rng.choice([1, max_len, rng.randint(1, max_len)])
        cases.append((params, _accs(rng, acc_width, s, z, n)))
    # S = 1 with z = 0, 1, 2: the saturation bounds fall on exact accumulator values; all of
    # them, each vector with every edge accumulator
    for z in (0, 1, 2):
        params = {"mvn": 1, "sh": 0, "mant": 1, "e": 0, "gamma_mant": 1, "scale_exp": z}
        cases.append((params, _edge_accs(acc_width, *arith.rescale_factor(**params))))
    return cases


def expected_outputs(cases):
    """``(y, last)`` per element and ``(S, z)`` per element, from arith.rescale_factor/rescale."""
    ys, factors = [], []
    for params, accs in cases:
        s, z = arith.rescale_factor(**params)
        y = arith.rescale(np.array(accs, dtype=np.int64), s, z)
        ys += [(int(v), int(j == len(accs) - 1)) for j, v in enumerate(y)]
        factors += [(int(s), int(z))] * len(accs)
    return ys, factors


def param_beats(cases):
    return [params for params, _ in cases]


def acc_beats(cases):
    return [{"acc": a, "last": int(j == len(accs) - 1)} for _, accs in cases
            for j, a in enumerate(accs)]


# ------------------------------------------------------------------------------- cocotb tests

async def _run_cases(dut, idle: float, stall: float, seed_offset: int) -> None:
    params = tb_params()
    seed = params["seed"] + seed_offset
    dut._log.info(f"seed {seed} idle {idle} stall {stall}")
    rng = random.Random(seed)
    await start_and_reset(dut)
    cases = rescale_cases(rng, params["acc_width"], params["n_random"])
    want, want_factors = expected_outputs(cases)
    par = StreamSource(dut, "i_params", RescaleParams(), dut.clk, idle=idle,
                       rng=random.Random(seed + 1))
    src = StreamSource(dut, "i_stream", AccBeat(params["acc_width"]), dut.clk, idle=idle,
                       rng=random.Random(seed + 2))
    factors = []                # the s/z ports at every accepted element
    snk = StreamSink(dut, "o_stream", RescaleBeat(), dut.clk, stall=stall,
                     rng=random.Random(seed + 3))
    snk.start()
    cocotb.start_soon(par.send(param_beats(cases)))
    await src.send(acc_beats(cases), on_accept=lambda _: factors.append(
        (int(dut.s.value), unpack(Z_SHAPE, int(dut.z.value)))))
    items = await snk.wait_for(len(want), timeout_cycles=200 * len(cases) + 20 * len(want))
    got = [(item["y"], item["last"]) for item in items]
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"element {k}: got (y, last) = {g}, want {w}"
    for k, (g, w) in enumerate(zip(factors, want_factors)):
        assert g == w, f"element {k}: (s, z) ports {g}, rescale_factor gives {w}"
    for _ in range(100):                       # nothing extra comes out
        await RisingEdge(dut.clk)
    assert len(snk.items) == len(want), f"{len(snk.items) - len(want)} extra outputs"
    assert par.sent == len(cases) and src.sent == len(want)


@cocotb.test()
async def rescale_no_gaps(dut):
    await _run_cases(dut, 0.0, 0.0, 0)


@cocotb.test()
async def rescale_gaps_and_backpressure(dut):
    await _run_cases(dut, 0.3, 0.4, 100)
