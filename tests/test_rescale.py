# amaranth: UnusedElaboratable=no
# (the tests of rejected parameters build components that are never elaborated)
"""The BitLinear rescale unit against arith.rescale_factor and arith.rescale: Amaranth simulator
and cocotb."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree.hdl.rescale import FACTOR_CYCLES_MAX, Rescale, factor_cycles
from mmfree.models import arith
from mmfree.sim.amaranth_streams import stream_put_all
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb
from mmfree.sim.tb_rescale import acc_beats, expected_outputs, param_beats, rescale_cases


def simulate(dut, params, beats, *, idle=0.0, stall=0.0, seed=0, params_first=False):
    """Stream the parameter beats and the elements in (independently, unless ``params_first``:
    then each parameter beat is sent only after the previous vector's elements), take every
    output. Returns ``(outputs, factors, t_params, t_in, t_out)``: outputs ``(y, last)``, the
    ``(s, z)`` ports sampled at each accepted element, and the cycles of every transfer."""
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    n_out = len(beats)
    out, factors, t_par, t_in, t_out = [], [], [], [], []
    timeout = 300 * len(params) + 30 * n_out + 1000

    async def monitor(ctx):
        p, i, o = dut.i_params, dut.i_stream, dut.o_stream
        cycle = 0
        async for _, _, pv, pr, iv, ir, ov, orr in ctx.tick().sample(
                p.valid, p.ready, i.valid, i.ready, o.valid, o.ready):
            cycle += 1
            if pv and pr:
                t_par.append(cycle)
            if iv and ir:
                t_in.append(cycle)
            if ov and orr:
                t_out.append(cycle)

    async def param_source(ctx):
        rng = random.Random(seed + 1)
        for k, beat in enumerate(params):
            if params_first:
                ends = sum(b["last"] for b in beats[:len(t_in)])
                while ends < k:
                    await ctx.tick()
                    ends = sum(b["last"] for b in beats[:len(t_in)])
            await stream_put_all(ctx, dut.i_params, [beat], idle=idle, rng=rng)

    async def source(ctx):
        rng = random.Random(seed + 2)
        i = dut.i_stream
        for beat in beats:
            while idle and rng.random() < idle:
                await ctx.tick()
            ctx.set(i.payload, beat)
            ctx.set(i.valid, 1)
            s, z = await ctx.tick().sample(dut.s, dut.z).until(i.ready)
            factors.append((s, z))
            ctx.set(i.valid, 0)

    async def sink(ctx):
        rng = random.Random(seed + 3)
        waited = 0
        while len(out) < n_out:
            ready = not (stall and rng.random() < stall)
            ctx.set(dut.o_stream.ready, ready)
            _, _, p, valid = await ctx.tick().sample(dut.o_stream.payload, dut.o_stream.valid)
            waited += 1
            assert waited < timeout, f"only {len(out)} of {n_out} outputs came out"
            if ready and valid:
                out.append((p.y, p.last))
        ctx.set(dut.o_stream.ready, 1)
        for _ in range(100):
            await ctx.tick()
            assert not ctx.get(dut.o_stream.valid), "an output more than expected"

    sim.add_testbench(monitor, background=True)
    sim.add_testbench(param_source)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return out, factors, t_par, t_in, t_out


def check(cases, out, factors):
    want, want_factors = expected_outputs(cases)
    assert len(out) == len(want)
    for k, (g, w) in enumerate(zip(out, want)):
        assert g == w, f"element {k}: got (y, last) = {g}, want {w}"
    for k, (g, w) in enumerate(zip(factors, want_factors)):
        assert g == w, f"element {k}: (s, z) ports {g}, rescale_factor gives {w}"


@pytest.mark.parametrize("acc_width,n_random,idle,stall,seed", [
    (17, 80, 0.0, 0.0, 21),
    (17, 80, 0.3, 0.4, 22),
    (24, 60, 0.2, 0.3, 23),
    (16, 20, 0.2, 0.2, 24),
    (2, 10, 0.1, 0.1, 25),
    (18, 20, 0.2, 0.2, 27),
    (32, 20, 0.1, 0.3, 26),
])
def test_rescale_matches_arith(acc_width, n_random, idle, stall, seed):
    print("seed", seed)
    cases = rescale_cases(random.Random(seed), acc_width, n_random)
    out, factors, *_ = simulate(Rescale(acc_width), param_beats(cases), acc_beats(cases),
                                idle=idle, stall=stall, seed=seed)
    check(cases, out, factors)


def test_rescale_cases_cover_the_edges():
    """The generated cases reach the corners of the contract: z < 0, z = 0, z > 62 (clamped),
    mvn = 0, acc = 0 and the width's extremes, saturation at both ends."""
    cases = rescale_cases(random.Random(21), 17, 40)
    zs = [arith.rescale_factor(**p)[1] for p, _ in cases]
    assert min(zs) < -16 and 0 in zs and max(zs) > 62 and any(-16 <= z < 0 for z in zs)
    assert any(p["mvn"] == 0 for p, _ in cases)
    accs = [a for _, accs in cases for a in accs]
    assert {0, -(1 << 16), (1 << 16) - 1} <= set(accs)
    ys = [y for y, _ in expected_outputs(cases)[0]]
    assert 32767 in ys and -32768 in ys


@pytest.mark.parametrize("acc_width,latency", [(17, 7), (16, 7), (18, 8)])
def test_rescale_timing(acc_width, latency):
    """Documented timing: the factor takes factor_cycles(...) from the parameter beat, elements
    go one per cycle with dut.latency cycles latency, and a vector whose parameters were sent early
    follows the previous one after one idle cycle (the previous one lasting longer than the
    factor computation)."""
    rng = random.Random(8)
    n = FACTOR_CYCLES_MAX + 3
    cases = rescale_cases(rng, acc_width, 0)
    cases = [cases[i] for i in (3, 7, 14, 20)]          # z = -16, z = 0, z = 47, mvn = 0
    cases = [(p, [rng.randint(-3000, 3000) for _ in range(n)]) for p, _ in cases]
    beats = acc_beats(cases)
    dut = Rescale(acc_width)
    out, factors, t_par, t_in, t_out = simulate(dut, param_beats(cases), beats)
    check(cases, out, factors)
    assert dut.latency == latency
    assert t_in[0] - t_par[0] == factor_cycles(**cases[0][0])
    assert max(factor_cycles(**p) for p, _ in cases) <= FACTOR_CYCLES_MAX
    for k in range(len(cases)):
        first = n * k
        assert t_in[first:first + n] == list(range(t_in[first], t_in[first] + n))
        if k:
            assert t_in[first] - t_in[first - 1] == 2                 # one idle cycle
    assert [b - a for a, b in zip(t_in, t_out)] == [latency] * len(beats)


def test_rescale_params_after_each_vector():
    """Parameters that arrive only after the previous vector ended (no early loading)."""
    cases = rescale_cases(random.Random(31), 20, 6)
    out, factors, t_par, t_in, _ = simulate(Rescale(20), param_beats(cases), acc_beats(cases),
                                            idle=0.2, stall=0.3, seed=31, params_first=True)
    check(cases, out, factors)


def test_factor_cycles_bounds():
    lo = min(factor_cycles(**p) for p, _ in rescale_cases(random.Random(1), 17, 50))
    assert lo >= factor_cycles(mvn=1, sh=0, mant=1, e=0, gamma_mant=1, scale_exp=40)
    assert FACTOR_CYCLES_MAX == factor_cycles(mvn=(1 << 15) - 1, sh=31, mant=(1 << 16) - 1, e=0,
                                              gamma_mant=(1 << 16) - 1, scale_exp=-128)


def test_expected_uses_arith():
    params = {"mvn": 20000, "sh": 3, "mant": 40000, "e": 30, "gamma_mant": 50000, "scale_exp": 2}
    s, z = arith.rescale_factor(**params)
    ys, factors = expected_outputs([(params, [5, -7])])
    assert factors == [(s, z)] * 2
    assert ys == [(int(v), j) for j, v in enumerate(arith.rescale(np.array([5, -7]), s, z))]


@pytest.mark.parametrize("bad", [1, 33, 17.0])
def test_rescale_rejects_bad_width(bad):
    with pytest.raises(ValueError, match="acc_width must be an integer from 2 to 32"):
        Rescale(bad)


@pytest.mark.parametrize("acc_width", [17, 24])
def test_rescale_cocotb(tmp_path, acc_width):
    if not icarus_available():
        pytest.fail(ICARUS_MISSING)
    seed = 4000 + acc_width
    print("seed", seed)
    run_cocotb(Rescale(acc_width), f"rescale_{acc_width}", "mmfree.sim.tb_rescale", tmp_path,
               params={"acc_width": acc_width, "seed": seed, "n_random": 50}, seed=seed)
