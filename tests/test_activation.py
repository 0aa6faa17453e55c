# amaranth: UnusedElaboratable=no
"""Tests of hdl/activation.py: SigmoidPipe (all 65536 int16 inputs), its stream form
SigmoidSiLU and the GLU, against arith.sigmoid_q / silu_q / glu; Amaranth simulator and
cocotb + Icarus."""

import random

import numpy as np
import pytest
from amaranth import Cat, Module, Signal
from amaranth.sim import Simulator

from mmfree.hdl.activation import GLU, SigmoidPipe, SigmoidSiLU
from mmfree.models import arith
from mmfree.sim.amaranth_streams import stream_get_all, stream_put_all
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb
from mmfree.sim.tb_activation import (EDGE_X, edge_and_random_x, expected_glu,
                                      expected_sigmoid_silu, glu_triples)

FLOWS = [(0.0, 0.0), (0.3, 0.3), (0.1, 0.7)]


def _signed16(words):
    a = np.asarray(words, dtype=np.int64)
    return np.where(a >= 1 << 15, a - (1 << 16), a)


def test_sigmoid_pipe_all_int16():
    """Every int16 x through 16 SigmoidPipe lanes (4096 cycles): sigma, sigma_m, silu bit-exact
    with arith, each exactly SIGMA_LATENCY / SILU_LATENCY cycles after its input."""
    lanes = 16
    m = Module()
    pipes = [SigmoidPipe() for _ in range(lanes)]
    x_in = Signal(16 * lanes)
    valid = Signal()
    outs = {name: Signal(16 * lanes, name=name) for name in ("sigma", "sigma_m", "silu")}
    for k, pipe in enumerate(pipes):
        m.submodules[f"pipe{k}"] = pipe
        m.d.comb += [pipe.i_x.eq(x_in[16 * k:16 * k + 16]), pipe.i_valid.eq(valid)]
    for name, sig in outs.items():
        m.d.comb += sig.eq(Cat(getattr(pipe, name) for pipe in pipes))
    xs = np.arange(-32768, 32768, dtype=np.int64).reshape(-1, lanes)     # one row per cycle
    words = [sum((int(x) & 0xFFFF) << (16 * k) for k, x in enumerate(row)) for row in xs]
    n = len(words)
    got = {"sigma": [], "sigma_m": [], "silu": []}

    async def tb(ctx):
        ctx.set(valid, 1)
        for cycle in range(n + SigmoidPipe.SILU_LATENCY + 1):
            ctx.set(x_in, words[cycle] if cycle < n else 0)
            ctx.set(valid, cycle < n)
            k = cycle - SigmoidPipe.SIGMA_LATENCY
            assert ctx.get(pipes[0].sigma_valid) == (0 <= k < n)
            if 0 <= k < n:
                got["sigma"].append(ctx.get(outs["sigma"]))
                got["sigma_m"].append(ctx.get(outs["sigma_m"]))
            k = cycle - SigmoidPipe.SILU_LATENCY
            assert ctx.get(pipes[0].silu_valid) == (0 <= k < n)
            if 0 <= k < n:
                got["silu"].append(ctx.get(outs["silu"]))
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()

    def lanes_of(words, signed):
        a = np.array([[(w >> (16 * k)) & 0xFFFF for k in range(lanes)] for w in words], np.int64)
        return _signed16(a) if signed else a

    want_sigma = arith.sigmoid_q(xs)
    assert np.array_equal(lanes_of(got["sigma"], False), want_sigma)
    assert np.array_equal(lanes_of(got["sigma_m"], True), want_sigma - (1 << 14))
    assert np.array_equal(lanes_of(got["silu"], True), arith.silu_q(xs))


def test_sigmoid_pipe_enable_and_tag():
    """A random clock enable freezes the pipeline: outputs (and tags) still come out in order
    and bit-exact, counted in enabled cycles."""
    seed = 77
    print("seed", seed)
    rng = random.Random(seed)
    dut = SigmoidPipe(tag_width=5)
    xs = edge_and_random_x(rng, 300)
    want = expected_sigmoid_silu(xs)
    got = []

    async def tb(ctx):
        k = 0
        while len(got) < len(xs):
            en = rng.random() < 0.6
            ctx.set(dut.en, en)
            ctx.set(dut.i_valid, k < len(xs))
            ctx.set(dut.i_x, xs[k] if k < len(xs) else 0)
            ctx.set(dut.i_tag, k % 32)
            if en and ctx.get(dut.silu_valid):
                got.append((ctx.get(dut.silu), ctx.get(dut.o_tag)))
            if en:
                k += 1
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    assert got == [(w["silu"], k % 32) for k, w in enumerate(want)]


def test_sigmoid_pipe_rejects_bad_tag():
    with pytest.raises(ValueError, match="tag_width must be 0 or more bits"):
        SigmoidPipe(tag_width=-1)


def _run_stream(dut, beats, n_out, idle, stall, seed):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []

    async def src(ctx):
        await stream_put_all(ctx, dut.i_stream, beats, idle=idle, rng=random.Random(seed))

    async def snk(ctx):
        got.extend(await stream_get_all(ctx, dut.o_stream, n_out, stall=stall,
                                        rng=random.Random(seed + 1)))
        for _ in range(40):                     # nothing more may come out
            assert not ctx.get(dut.o_stream.valid)
            await ctx.tick()

    sim.add_testbench(src)
    sim.add_testbench(snk)
    sim.run()
    return got


@pytest.mark.parametrize("idle,stall", FLOWS)
def test_sigmoid_silu_stream(idle, stall):
    seed = 11 + int(idle * 10 + stall * 100)
    print("seed", seed)
    xs = edge_and_random_x(random.Random(seed), 1500)
    beats = [{"x": x, "last": int(k % 7 == 6)} for k, x in enumerate(xs)]
    got = _run_stream(SigmoidSiLU(), beats, len(xs), idle, stall, seed)
    for k, (want, out) in enumerate(zip(expected_sigmoid_silu(xs), got)):
        assert (out.sigma, out.silu, out.last) == (want["sigma"], want["silu"], beats[k]["last"]), \
            f"element {k}, x = {xs[k]}"


@pytest.mark.parametrize("idle,stall", FLOWS)
def test_glu_stream(idle, stall):
    seed = 21 + int(idle * 10 + stall * 100)
    print("seed", seed)
    triples = glu_triples(random.Random(seed), 1000)
    beats = [{"gate": g, "up": u, "u_frac": f, "last": int(k % 5 == 4)}
             for k, (g, u, f) in enumerate(triples)]
    got = _run_stream(GLU(), beats, len(triples), idle, stall, seed)
    for k, (want, out) in enumerate(zip(expected_glu(triples), got)):
        assert (out.u, out.last) == (want, beats[k]["last"]), \
            f"element {k}, (gate, up, u_frac) = {triples[k]}"


def test_glu_vectors_saturate():
    """The GLU test vectors reach both saturation ends, so sat16 is exercised."""
    u = expected_glu(glu_triples(random.Random(0), 0))
    assert 32767 in u and -32768 in u


@pytest.mark.parametrize("unit", [SigmoidSiLU, GLU])
def test_latency_and_throughput(unit):
    """Without gaps or back-pressure: one element per cycle, first output LATENCY cycles after
    the first input transfers; i_stream.ready never drops."""
    dut = unit()
    n = 50
    if unit is GLU:
        beats = [{"gate": 100 * k, "up": 7, "u_frac": 9, "last": 0} for k in range(n)]
    else:
        beats = [{"x": 100 * k, "last": 0} for k in range(n)]
    log = []

    async def tb(ctx):
        ctx.set(dut.o_stream.ready, 1)
        for cycle in range(n + unit.LATENCY + 5):
            k = min(cycle, n - 1)
            ctx.set(dut.i_stream.payload, beats[k])
            ctx.set(dut.i_stream.valid, cycle < n)
            if cycle < n:
                assert ctx.get(dut.i_stream.ready)
            if ctx.get(dut.o_stream.valid):
                log.append(cycle)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    assert log == list(range(unit.LATENCY, unit.LATENCY + n))


@pytest.mark.skipif(not icarus_available(), reason=ICARUS_MISSING)
@pytest.mark.parametrize("unit,name", [(SigmoidSiLU, "sigmoid_silu"), (GLU, "glu")])
def test_cocotb(unit, name, tmp_path):
    seed = 4242
    print("seed", seed)
    run_cocotb(unit(), name, "mmfree.sim.tb_activation", tmp_path,
               params={"unit": name, "seed": seed}, seed=seed)


def test_edge_values_cover_the_datapath():
    """The edge list holds the int16 ends, the saturation point and both signs."""
    assert {-32768, 32767, 16383, -16383, 16384, 0, 1, -1} <= set(EDGE_X)
