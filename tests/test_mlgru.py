# amaranth: UnusedElaboratable=no
"""Tests of hdl/mlgru.py against a Python loop of arith.forget_gate / mlgru_update /
output_gate: Amaranth simulator and cocotb + Icarus."""

import random

import pytest
from amaranth.sim import Simulator

from mmfree.hdl.mlgru import MLGRU
from mmfree.sim.amaranth_streams import stream_get_all, stream_put, stream_put_all
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb
from mmfree.sim.tb_mlgru import (LB_EDGES, RESET, beats, edge_tokens, expected_outputs,
                                 random_events, random_token)

FLOWS = [(0.0, 0.0), (0.3, 0.3), (0.1, 0.7)]


def run_events(dut: MLGRU, events, *, idle=0.0, stall=0.0, seed=0):
    """Drive the events (tokens and RESET requests, in order) into ``dut``; return every output
    as {"o", "last"}; fail if anything beyond the expected count comes out."""
    want_n = len(expected_outputs(events, dut.max_d, dut.max_layers))
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []
    rng = random.Random(seed)

    async def src(ctx):
        for ev in events:
            if ev == RESET:
                await stream_put(ctx, dut.reset_state, 0)
            else:
                await stream_put_all(ctx, dut.i_stream, beats(ev), idle=idle, rng=rng)

    async def snk(ctx):
        out = await stream_get_all(ctx, dut.o_stream, want_n, stall=stall,
                                   rng=random.Random(seed + 1))
        got.extend({"o": x.o, "last": x.last} for x in out)
        for _ in range(3 * dut.LATENCY):        # nothing more may come out
            assert not ctx.get(dut.o_stream.valid)
            await ctx.tick()

    sim.add_testbench(src)
    sim.add_testbench(snk)
    sim.run()
    return got


def check(dut, events, **flow):
    want = expected_outputs(events, dut.max_d, dut.max_layers)
    got = run_events(dut, events, **flow)
    assert len(got) == len(want)
    for k, (w, o) in enumerate(zip(want, got)):
        assert o == w, f"output {k}: got {o}, want {w}"


@pytest.mark.parametrize("idle,stall", FLOWS)
def test_random_two_layers_interleaved(idle, stall):
    seed = 100 + int(idle * 10 + stall * 100)
    print("seed", seed)
    rng = random.Random(seed)
    dut = MLGRU(max_d=8, max_layers=2)
    check(dut, random_events(rng, 60, 8, 2), idle=idle, stall=stall, seed=seed)


@pytest.mark.parametrize("idle,stall", [(0.0, 0.0), (0.3, 0.3)])
def test_edges(idle, stall):
    """int16 extremes of i_pre, f_pre, gn; every edge lower bound (0, 1, 0.5, 32767, 32768),
    with and without lower bound; output shifts g_frac + PRE_FRAC - o_frac of -5 and 25."""
    seed = 200 + int(idle * 10)
    print("seed", seed)
    rng = random.Random(seed)
    dut = MLGRU(max_d=8, max_layers=2)
    events = edge_tokens(rng, 8, 0) + edge_tokens(rng, 8, 1)
    check(dut, events, idle=idle, stall=stall, seed=seed)


@pytest.mark.parametrize("lb", LB_EDGES)
def test_lower_bound_edges(lb):
    """The same lower bound on every channel: 0 (f = σ), near and exactly 1 (f = 1 keeps h),
    with the layer's lower bound ignored when has_lb is 0 (layer 0)."""
    seed = 300 + lb % 97
    print("seed", seed)
    rng = random.Random(seed)
    events = []
    for _ in range(8):
        for layer in (0, 1):
            tok = random_token(rng, 6, layer, has_lb=layer == 1)
            tok["lb"] = [lb] * 6
            events.append(tok)
    check(MLGRU(max_d=6, max_layers=2), events, seed=seed)


def test_state_over_50_tokens():
    """h evolves over 50 consecutive full tokens of one layer; o checked every token."""
    seed = 400
    print("seed", seed)
    rng = random.Random(seed)
    events = [random_token(rng, 16, 0, has_lb=True) for _ in range(50)]
    check(MLGRU(max_d=16), events, idle=0.1, stall=0.2, seed=seed)


@pytest.mark.parametrize("idle,stall", [(0.0, 0.0), (0.2, 0.5)])
def test_reset_state_in_the_middle(idle, stall):
    """State resets between tokens (also right behind a token still in flight), 3 layers of a
    non-power-of-two max_d (address = layer · max_d + channel)."""
    seed = 500 + int(stall * 10)
    print("seed", seed)
    rng = random.Random(seed)
    events = random_events(rng, 40, 5, 3, resets=3)
    check(MLGRU(max_d=5, max_layers=3), events, idle=idle, stall=stall, seed=seed)


def test_single_channel_tokens():
    """Tokens of one channel back to back (the h of the previous launch is not written yet:
    the hazard stall), alternating and repeating layers; also max_d = 1."""
    seed = 600
    print("seed", seed)
    rng = random.Random(seed)
    events = [random_token(rng, 1, layer, has_lb=layer == 1) for layer in [0, 0, 1, 1, 0, 1] * 4]
    check(MLGRU(max_d=4, max_layers=2), events, seed=seed)
    check(MLGRU(max_d=1, max_layers=2), events, seed=seed)


def test_latency_throughput_and_clear():
    """After reset the state clears (max_layers · max_d cycles, ``clearing`` high, no input
    taken); then one element per 3 cycles, each output LATENCY cycles after its input."""
    dut = MLGRU(max_d=8, max_layers=2)
    rng = random.Random(700)
    tokens = [random_token(rng, 8, layer, has_lb=layer == 1) for layer in (0, 1, 0)]
    elems = [b for t in tokens for b in beats(t)]
    want = expected_outputs(tokens, 8, 2)
    transfers, outputs, clearing = [], [], []

    async def tb(ctx):
        ctx.set(dut.o_stream.ready, 1)
        k = 0
        for cycle in range(400):
            clearing.append(ctx.get(dut.clearing))
            ctx.set(dut.i_stream.payload, elems[min(k, len(elems) - 1)])
            ctx.set(dut.i_stream.valid, k < len(elems))
            if k < len(elems) and ctx.get(dut.i_stream.ready):
                transfers.append(cycle)
                k += 1
            if ctx.get(dut.o_stream.valid):
                outputs.append((cycle, {"o": ctx.get(dut.o_stream.p.o),
                                        "last": ctx.get(dut.o_stream.p.last)}))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    depth = 16
    assert clearing[:depth] == [1] * depth and not any(clearing[depth + 1:])
    assert transfers[0] >= depth
    assert [b - a for a, b in zip(transfers, transfers[1:])] == [MLGRU.II] * (len(elems) - 1)
    assert [c for c, _ in outputs] == [t + MLGRU.LATENCY for t in transfers]
    assert [o for _, o in outputs] == want


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="max_d must be a positive number of channels"):
        MLGRU(0)
    with pytest.raises(ValueError, match="max_layers must be 1 or more"):
        MLGRU(8, max_layers=0)
    with pytest.raises(ValueError, match="use fewer layers or channels per unit"):
        MLGRU(4096, max_layers=32)


@pytest.mark.skipif(not icarus_available(), reason=ICARUS_MISSING)
def test_cocotb(tmp_path):
    seed = 8080
    print("seed", seed)
    max_d, max_layers = 6, 3
    run_cocotb(MLGRU(max_d, max_layers), "mlgru", "mmfree.sim.tb_mlgru", tmp_path,
               params={"max_d": max_d, "max_layers": max_layers, "seed": seed}, seed=seed)
