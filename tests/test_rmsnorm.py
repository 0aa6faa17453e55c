"""Tests of hdl/rmsnorm.py: every output word against ``arith.irsqrt`` / ``arith.norm_stats`` /
``arith.rmsnorm``, in the Amaranth simulator and (through ``run_cocotb``) under Icarus.

The cases come from sim/tb_rmsnorm.py, shared by both levels; each test prints its seed.
"""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree.hdl.rmsnorm import (MAX_N_LIMIT, IRSqrt, NormApply, NormStats, RMSNorm,
                                irsqrt_latency, norm_steps, stats_latency, stats_widths)
from mmfree.models import arith
from mmfree.sim.amaranth_streams import stream_get_all, stream_put_all
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb
from mmfree.sim.tb_rmsnorm import (apply_beats, apply_cases, irsqrt_values, mant_cases,
                                   norm_beats, rmsnorm_cases, stats_beats, stats_cases)

SEED = 20261129
GAPS = [pytest.param(0.0, 0.0, id="smooth"), pytest.param(0.3, 0.4, id="gaps")]


def _sim(dut):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    return sim


# --------------------------------------------------------------------------- constructors

@pytest.mark.parametrize("bad", [0, -1, MAX_N_LIMIT + 1, 1.5, "8"])
def test_norm_stats_rejects_bad_max_n(bad):
    with pytest.raises(ValueError, match=r"max_n must be an integer in 1\.\.1048576 \(the longest "
                                         r"vector"):
        NormStats(bad)
    with pytest.raises(ValueError, match="max_n must be an integer"):
        RMSNorm(bad)


@pytest.mark.parametrize("bad", [0, 63, 2.0])
def test_irsqrt_rejects_bad_width(bad):
    with pytest.raises(ValueError, match=r"u_width must be an integer in 1\.\.62"):
        IRSqrt(bad)


def test_widths_and_latencies():
    # the width must hold max_n · 2**30 exactly (an all -32768 vector), and no more
    for max_n in (1, 2, 3, 127, 128, 4096, MAX_N_LIMIT):
        ss_width, n_width = stats_widths(max_n)
        assert max_n * (1 << 30) < 1 << ss_width
        assert max_n * (1 << 30) >= 1 << (ss_width - 1)
        assert max_n < 1 << n_width
    assert stats_widths(4096) == (43, 13)
    # norm_steps: the greedy 8-or-2-bit walk of the normalizer, worst case over bit lengths
    assert [norm_steps(w) for w in (1, 33, 58, 59, 62)] == [5, 5, 5, 6, 6]
    assert stats_latency(4096) == 43 + 84 and stats_latency(1) == 34 + 84
    assert irsqrt_latency(62) == 53 and irsqrt_latency(33) == 52


# --------------------------------------------------------------------------- IRSqrt

@pytest.mark.parametrize("u_width", [62, 33, 1])
def test_irsqrt_matches_golden(u_width):
    seed = SEED + u_width
    print("seed", seed)
    values = irsqrt_values(random.Random(seed), u_width, 30)
    dut = IRSqrt(u_width)
    sim = _sim(dut)
    got, latencies = [], []

    async def tb(ctx):
        rng = random.Random(seed)
        for u in values:
            ctx.set(dut.i_stream.payload, u)
            ctx.set(dut.i_stream.valid, 1)
            assert ctx.get(dut.i_stream.ready)          # idle again right after each result
            await ctx.tick()
            ctx.set(dut.i_stream.valid, 0)
            cycles = 1
            while not ctx.get(dut.o_stream.valid):
                assert not ctx.get(dut.i_stream.ready)
                await ctx.tick()
                cycles += 1
            latencies.append(cycles)
            for _ in range(rng.randrange(3)):           # the result is held under back-pressure
                await ctx.tick()
            ctx.set(dut.o_stream.ready, 1)
            got.append(ctx.get(dut.o_stream.payload))
            await ctx.tick()
            ctx.set(dut.o_stream.ready, 0)

    sim.add_testbench(tb)
    sim.run()
    assert [(r.mant, r.e) for r in got] == [arith.irsqrt(u) for u in values]
    assert set(latencies) == {dut.latency} == {irsqrt_latency(u_width)}
    # every normalization shift of this width occurred
    assert {r.e for r in got} == {arith.irsqrt(1 << b)[1] for b in range(u_width)}


# --------------------------------------------------------------------------- NormStats

def _run_stats(dut, cases, idle, stall, seed):
    sim = _sim(dut)
    got = []

    async def source(ctx):
        rng = random.Random(seed)
        for x, eps_q in cases:
            ctx.set(dut.eps_q, eps_q)
            await stream_put_all(ctx, dut.i_stream, stats_beats(x), idle=idle, rng=rng)

    async def sink(ctx):
        got.extend(await stream_get_all(ctx, dut.o_stream, len(cases), stall=stall,
                                        rng=random.Random(seed + 1)))
        for _ in range(dut.latency + 10):               # nothing more comes out
            assert not ctx.get(dut.o_stream.valid)
            await ctx.tick()

    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return [(r.mant, r.e) for r in got]


@pytest.mark.parametrize("idle,stall", GAPS)
def test_norm_stats_matches_golden(idle, stall):
    seed = SEED + 1
    print("seed", seed)
    max_n = 128
    cases = stats_cases(seed, max_n, 20)
    got = _run_stats(NormStats(max_n), cases, idle, stall, seed)
    assert got == [arith.norm_stats(x, eps_q) for x, eps_q in cases]
    # u took every bit length 1..33, so every normalization shift occurred (e = 30 - s)
    assert {e for _, e in got} == set(range(16, 33))


def test_norm_stats_max_n_4096():
    """Vectors of the full length: -32768 everywhere makes ss = 2**42, the accumulator's top
    bit; a random one; and short vectors in the same wide unit."""
    seed = SEED + 2
    print("seed", seed)
    rng = np.random.default_rng(seed)
    cases = [(np.full(4096, -32768), 1), (np.full(4096, 32767), (1 << 32) - 1),
             (rng.integers(-32768, 32768, 4096), 7), (np.array([5]), 1),
             (rng.integers(-32768, 32768, 3), 1)]
    got = _run_stats(NormStats(4096), cases, 0.05, 0.3, seed)
    assert got == [arith.norm_stats(x, eps_q) for x, eps_q in cases]


@pytest.mark.parametrize("max_n", [1, 128, 4096])
def test_norm_stats_latency_and_throughput(max_n):
    """Cycle by cycle: the elements of a vector transfer on consecutive cycles, ready stays low
    from the cycle after ``last`` until the result has transferred, the result rises exactly
    ``latency`` cycles after ``last``, and ready is back in the next cycle."""
    seed = SEED + 3
    print("seed", seed)
    rng = np.random.default_rng(seed)
    cases = [(rng.integers(-32768, 32768, int(rng.integers(1, min(max_n, 40) + 1))),
              int(rng.integers(1, 1 << 20))) for _ in range(4)]
    dut = NormStats(max_n)
    sim = _sim(dut)

    async def tb(ctx):
        for k, (x, eps_q) in enumerate(cases):
            ctx.set(dut.eps_q, eps_q)
            for beat in stats_beats(x):
                ctx.set(dut.i_stream.payload, beat)
                ctx.set(dut.i_stream.valid, 1)
                assert ctx.get(dut.i_stream.ready)
                await ctx.tick()
            ctx.set(dut.i_stream.valid, 0)
            cycles = 1
            while not ctx.get(dut.o_stream.valid):
                assert not ctx.get(dut.i_stream.ready)
                await ctx.tick()
                cycles += 1
            assert cycles == dut.latency
            for _ in range(k):                          # held while o_stream.ready is low
                await ctx.tick()
                assert ctx.get(dut.o_stream.valid) and not ctx.get(dut.i_stream.ready)
            result = ctx.get(dut.o_stream.payload)
            assert (result.mant, result.e) == arith.norm_stats(x, eps_q)
            ctx.set(dut.o_stream.ready, 1)
            await ctx.tick()
            ctx.set(dut.o_stream.ready, 0)
            assert ctx.get(dut.i_stream.ready) and not ctx.get(dut.o_stream.valid)

    sim.add_testbench(tb)
    sim.run()


# --------------------------------------------------------------------------- NormApply

@pytest.mark.parametrize("idle,stall", GAPS)
def test_norm_apply_matches_golden(idle, stall):
    seed = SEED + 4
    print("seed", seed)
    cases = apply_cases(seed) + mant_cases(seed)
    dut = NormApply()
    sim = _sim(dut)
    expected = [int(v) for case in cases for v in case["expected"]]
    got = []

    async def source(ctx):
        rng = random.Random(seed)
        for case in cases:
            ctx.set(dut.mant, case["mant"])
            ctx.set(dut.shift, case["shift"])
            await stream_put_all(ctx, dut.i_stream, apply_beats(case["x"], case["w"]),
                                 idle=idle, rng=rng)
            while ctx.get(dut.busy):                    # parameters change between vectors
                await ctx.tick()

    async def sink(ctx):
        got.extend(await stream_get_all(ctx, dut.o_stream, len(expected), stall=stall,
                                        rng=random.Random(seed + 1)))
        for _ in range(NormApply.latency + 5):
            assert not ctx.get(dut.o_stream.valid)
            await ctx.tick()

    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    assert got == expected
    # the cases reach both saturation limits, zero, and every shift
    assert {-32768, 32767, 0} <= set(expected)
    assert {case["shift"] for case in cases} == set(range(64))


def test_norm_apply_latency_and_throughput():
    """One element per cycle in and out; each result exactly ``latency`` cycles after its
    element; with o_stream.ready low, ready drops exactly while an output waits, nothing is
    lost or repeated."""
    seed = SEED + 5
    print("seed", seed)
    case = apply_cases(seed)[40]
    beats = apply_beats(case["x"], case["w"])
    expected = [int(v) for v in case["expected"]]
    dut = NormApply()
    sim = _sim(dut)

    async def tb(ctx):
        ctx.set(dut.mant, case["mant"])
        ctx.set(dut.shift, case["shift"])
        ctx.set(dut.o_stream.ready, 1)
        sent, outs = [], []
        for cycle in range(len(beats) + NormApply.latency + 2):
            beat = beats[cycle] if cycle < len(beats) else None
            ctx.set(dut.i_stream.valid, beat is not None)
            if beat is not None:
                ctx.set(dut.i_stream.payload, beat)
                assert ctx.get(dut.i_stream.ready)
                sent.append(cycle)
            if ctx.get(dut.o_stream.valid):
                outs.append((cycle, ctx.get(dut.o_stream.payload)))
            await ctx.tick()
        assert [c for c, _ in outs] == [c + NormApply.latency for c in sent]
        assert [y for _, y in outs] == expected
        assert not ctx.get(dut.busy)

        # output blocked: the pipeline fills, then ready follows o_stream.valid exactly
        ctx.set(dut.o_stream.ready, 0)
        taken, outs = 0, []
        rng = random.Random(seed)
        for cycle in range(600):
            if taken < len(beats):
                ctx.set(dut.i_stream.valid, 1)
                ctx.set(dut.i_stream.payload, beats[taken])
            else:
                ctx.set(dut.i_stream.valid, 0)
            out_ready = cycle > 30 and rng.random() < 0.5
            ctx.set(dut.o_stream.ready, out_ready)
            assert ctx.get(dut.i_stream.ready) == (not ctx.get(dut.o_stream.valid) or out_ready)
            if taken < len(beats) and ctx.get(dut.i_stream.ready):
                taken += 1
            if out_ready and ctx.get(dut.o_stream.valid):
                outs.append(ctx.get(dut.o_stream.payload))
            await ctx.tick()
        assert outs == expected

    sim.add_testbench(tb)
    sim.run()


# --------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("idle,stall", GAPS)
def test_rmsnorm_matches_golden(idle, stall):
    seed = SEED + 6
    print("seed", seed)
    max_n = 64
    cases = rmsnorm_cases(seed, max_n, 10)
    dut = RMSNorm(max_n)
    sim = _sim(dut)
    expected = [int(v) for case in cases for v in case["expected"]]
    got = []

    async def stats_pass(ctx):
        rng = random.Random(seed)
        for case in cases:
            ctx.set(dut.eps_q, case["eps_q"])
            ctx.set(dut.frac_diff, case["frac_diff"])
            await stream_put_all(ctx, dut.stats_stream, stats_beats(case["x"]), idle=idle,
                                 rng=rng)

    async def apply_pass(ctx):
        rng = random.Random(seed + 2)
        for case in cases:
            await stream_put_all(ctx, dut.apply_stream, norm_beats(case["x"], case["w"]),
                                 idle=idle, rng=rng)

    async def sink(ctx):
        got.extend(await stream_get_all(ctx, dut.o_stream, len(expected), stall=stall,
                                        rng=random.Random(seed + 1)))
        for _ in range(20):
            assert not ctx.get(dut.o_stream.valid)
            await ctx.tick()

    sim.add_testbench(stats_pass)
    sim.add_testbench(apply_pass)
    sim.add_testbench(sink)
    sim.run()
    assert got == expected


# --------------------------------------------------------------------------- cocotb + Icarus

cocotb_only = pytest.mark.skipif(not icarus_available(), reason=ICARUS_MISSING)


@cocotb_only
def test_cocotb_irsqrt(tmp_path):
    run_cocotb(IRSqrt(62), "irsqrt", "mmfree.sim.tb_rmsnorm", tmp_path, testcase="irsqrt_sweep",
               params={"seed": SEED + 10, "u_width": 62, "count": 40})


@cocotb_only
def test_cocotb_norm_stats(tmp_path):
    run_cocotb(NormStats(64), "norm_stats", "mmfree.sim.tb_rmsnorm", tmp_path,
               testcase="norm_stats", params={"seed": SEED + 11, "max_n": 64, "count": 6})


@cocotb_only
def test_cocotb_norm_apply(tmp_path):
    run_cocotb(NormApply(), "norm_apply", "mmfree.sim.tb_rmsnorm", tmp_path,
               testcase="norm_apply", params={"seed": SEED + 12})


@cocotb_only
def test_cocotb_rmsnorm(tmp_path):
    run_cocotb(RMSNorm(32), "rmsnorm", "mmfree.sim.tb_rmsnorm", tmp_path, testcase="rmsnorm",
               params={"seed": SEED + 13, "max_n": 32, "count": 8})
