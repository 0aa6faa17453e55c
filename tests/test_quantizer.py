# amaranth: UnusedElaboratable=no
# (the tests of rejected parameters build components that are never elaborated)
"""The activation quantizer against arith.quantize_activations: Amaranth simulator and cocotb."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree.hdl.quantizer import Quantizer
from mmfree.models import arith
from mmfree.sim.amaranth_streams import stream_put_all
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb
from mmfree.sim.tb_quantizer import expected_beats, input_beats, quantizer_cases


def simulate(dut, beats, n_out, *, idle=0.0, stall=0.0, seed=0, timeout=None):
    """Stream ``beats`` in, take ``n_out`` activations; returns ``(outputs, accept_cycles,
    output_cycles)`` with outputs ``(a, last, mvn, sh)`` (the held ports sampled at each
    transfer) and the cycle numbers of every input and output transfer. Fails if an extra
    activation appears within 100 cycles after the expected ones."""
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    out, t_in, t_out = [], [], []
    timeout = timeout or 30 * n_out + 2000

    async def monitor(ctx):
        i, o = dut.i_stream, dut.o_stream
        cycle = 0
        async for _, _, iv, ir, ov, orr in ctx.tick().sample(i.valid, i.ready, o.valid, o.ready):
            cycle += 1
            if iv and ir:
                t_in.append(cycle)
            if ov and orr:
                t_out.append(cycle)

    async def source(ctx):
        await stream_put_all(ctx, dut.i_stream, beats, idle=idle, rng=random.Random(seed + 1))

    async def sink(ctx):
        rng = random.Random(seed + 2)
        waited = 0
        while len(out) < n_out:
            ready = not (stall and rng.random() < stall)
            ctx.set(dut.o_stream.ready, ready)
            _, _, p, valid, mvn, sh = await ctx.tick().sample(
                dut.o_stream.payload, dut.o_stream.valid, dut.mvn, dut.sh)
            waited += 1
            assert waited < timeout, f"only {len(out)} of {n_out} activations came out"
            if ready and valid:
                out.append((p.a, p.last, mvn, sh))
        ctx.set(dut.o_stream.ready, 1)
        for _ in range(100):
            await ctx.tick()
            assert not ctx.get(dut.o_stream.valid), "an activation more than expected"

    sim.add_testbench(monitor, background=True)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return out, t_in, t_out


def check(out, want):
    assert len(out) == len(want)
    for k, (g, w) in enumerate(zip(out, want)):
        assert g == w, f"beat {k}: got (a, last, mvn, sh) = {g}, want {w}"


@pytest.mark.parametrize("max_n,n_random,idle,stall,seed", [
    (40, 60, 0.0, 0.0, 11),
    (40, 60, 0.3, 0.4, 12),
    (1, 20, 0.2, 0.3, 13),
    (2, 20, 0.5, 0.5, 15),
    (300, 4, 0.1, 0.2, 14),
])
def test_quantizer_matches_arith(max_n, n_random, idle, stall, seed):
    print("seed", seed)
    cases = quantizer_cases(random.Random(seed), max_n, n_random)
    want = expected_beats(cases)
    out, _, _ = simulate(Quantizer(max_n), input_beats(cases), len(want),
                         idle=idle, stall=stall, seed=seed)
    check(out, want)


def test_quantizer_cases_cover_the_edges():
    """The generated vectors reach the corners of the contract: all-zero, sh < 0, sh > 0 up
    to 16, lengths 1 and max_n, int16 extremes, a negative largest |v|, ties in the max."""
    max_n = 40
    cases = quantizer_cases(random.Random(11), max_n, 60)
    scales = [arith.quantize_activations(np.array(x), np.array(g))[1:] for x, g in cases]
    shs = {sh for _, sh in scales}
    assert (0, 0) in scales and min(shs) == -14 and 16 in shs and len(shs) > 20
    assert {1, max_n} <= {len(x) for x, _ in cases}
    assert any(-32768 in x and 32767 in g for x, g in cases)
    products = [np.array(x) * np.array(g) for x, g in cases]
    assert any(v[np.argmax(np.abs(v))] < 0 for v in products if v.any())
    assert any((np.abs(v) == np.abs(v).max()).sum() > 1 and v.min() < 0 < v.max()
               for v in products if v.any())


def test_quantizer_edge_scales():
    """Spot the documented scale edges directly: all-zero, 2**30, a lone 1, ties."""
    cases = [([0, 0, 0], [5, -3, 7]), ([-32768] * 4, [-32768] * 4), ([0, 1, 0], [9, 1, 9]),
             ([5, -5, 2], [7, 7, 7]), ([-32768, 32767], [32767, -32768])]
    want = expected_beats(cases)
    assert [w[2:] for w in want[:3]] == [(0, 0)] * 3          # all-zero: mvn = sh = 0
    assert want[3][3] == 16 and want[7][3] == -14              # sh extremes are covered
    out, _, _ = simulate(Quantizer(8), input_beats(cases), len(want), idle=0.2, stall=0.2, seed=3)
    check(out, want)


@pytest.mark.parametrize("n", [1, 20])
def test_quantizer_timing(n):
    """The documented latency and throughput: one element per cycle in and out, the first
    activation LATENCY cycles after the final element; back to back, the next vector streams
    in during the read-out and vectors follow each other every n + PERIOD_EXTRA cycles."""
    rng = random.Random(7)
    vectors = 3
    cases = [([rng.randint(-999, 999) for _ in range(n)],
              [rng.randint(-999, 999) for _ in range(n)]) for _ in range(vectors)]
    want = expected_beats(cases)
    out, t_in, t_out = simulate(Quantizer(32), input_beats(cases), len(want))
    check(out, want)
    assert t_in[:n] == list(range(t_in[0], t_in[0] + n))              # 1 element / cycle in
    assert t_out[0] - t_in[n - 1] == Quantizer.LATENCY
    for k in range(vectors):
        first = t_out[k * n]
        assert t_out[k * n:(k + 1) * n] == list(range(first, first + n))   # 1 / cycle out
        if k:
            assert first - t_out[(k - 1) * n] == n + Quantizer.PERIOD_EXTRA
            assert t_in[k * n] < t_out[k * n - 1]                     # input overlaps output


def test_quantizer_splits_overlong_vector():
    """A vector longer than max_n is closed at max_n elements; the rest is the next vector."""
    rng = random.Random(5)
    x = [rng.randint(-32768, 32767) for _ in range(11)]
    g = [rng.randint(-32768, 32767) for _ in range(11)]
    beats = [{"x": a, "g": b, "last": int(j == 10)} for j, (a, b) in enumerate(zip(x, g))]
    want = expected_beats([(x[:8], g[:8]), (x[8:], g[8:])])
    out, _, _ = simulate(Quantizer(8), beats, len(want), idle=0.1, stall=0.1, seed=5)
    check(out, want)


def test_expected_uses_arith():
    """The reference rows really are quantize_activations' results (guards the harness)."""
    x, g = [300, -2000, 7], [11, 13, -17]
    a, mvn, sh = arith.quantize_activations(np.array(x), np.array(g))
    assert expected_beats([(x, g)]) == [(int(v), int(j == 2), mvn, sh) for j, v in enumerate(a)]


@pytest.mark.parametrize("bad", [0, -3, (1 << 16) + 1, 2.5])
def test_quantizer_rejects_bad_max_n(bad):
    with pytest.raises(ValueError, match="max_n must be an integer from 1 to 65536"):
        Quantizer(bad)


def test_quantizer_cocotb(tmp_path):
    if not icarus_available():
        pytest.fail(ICARUS_MISSING)
    seed = 3011
    print("seed", seed)
    run_cocotb(Quantizer(24), "quantizer", "mmfree.sim.tb_quantizer", tmp_path,
               params={"max_n": 24, "seed": seed, "n_random": 40}, seed=seed)
