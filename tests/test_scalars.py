"""The BitLinear scalars unit against firmware.valu.bitlinear_scalars: Amaranth simulator."""

import random

import pytest
from amaranth.sim import Simulator

from mmfree.firmware.valu import bitlinear_scalars
from mmfree.hdl.scalars import MV_BITS, BitLinearScalars, scalars_cycles

MV_EDGES = [0, 1, 2, 3, 2**14 - 1, 2**14, 2**15 - 1, 2**15, 2**16 - 1, 2**16, 2**30,
            2**30 + 1, 2**31 - 1]
MANT_EDGES = [0, 1, 2, 2**15 - 1, 2**15, 2**15 + 1, 2**16 - 1]
GAMMA_EDGES = [2**15, 2**15 + 1, 2**16 - 1, 0, 1]
E_EDGES = [0, 16, 46, 63]
SCALE_EDGES = [-128, -127, -1, 0, 1, 127]


def _random_mv(rng):
    bits = rng.randrange(MV_BITS + 1)
    return 0 if bits == 0 else rng.randrange(1 << (bits - 1), 1 << bits)


def _cases(rng, n):
    cases = []
    for mv in MV_EDGES:                                   # every mv edge against extremes
        for mant in (0, 1, 2**15, 2**16 - 1):
            cases.append((mv, mant, rng.choice(E_EDGES), rng.choice(GAMMA_EDGES),
                          rng.choice(SCALE_EDGES)))
    for _ in range(n):
        mv = rng.choice(MV_EDGES) if rng.random() < 0.2 else _random_mv(rng)
        mant = rng.choice(MANT_EDGES) if rng.random() < 0.2 else rng.randrange(2**15, 2**16)
        gamma = rng.choice(GAMMA_EDGES) if rng.random() < 0.2 else rng.randrange(2**15, 2**16)
        e = rng.choice(E_EDGES) if rng.random() < 0.3 else rng.randrange(64)
        se = rng.choice(SCALE_EDGES) if rng.random() < 0.3 else rng.randrange(-128, 128)
        cases.append((mv, mant, e, gamma, se))
    return cases


def _expected(case):
    r = bitlinear_scalars(*case)
    return {"sh": r.sh, "qm": r.qm, "qs": r.qs, "recip": r.recip, "s": r.s, "zs": r.zs,
            "zb": r.zb}


def simulate(cases, *, gap=0.0, stall=0.0, seed=0):
    """Send every request (with random idle cycles when ``gap``), take every result (with random
    back-pressure when ``stall``). Returns the results and, per request, the cycles from the
    accepting edge to the first cycle of ``o_stream.valid``."""
    dut = BitLinearScalars()
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    rng = random.Random(seed)
    results, latencies = [], []
    accepted_at = []
    done = False

    async def producer(ctx):
        i = dut.i_stream
        for mv, mant, e, gamma, se in cases:
            while rng.random() < gap:
                await ctx.tick()
            ctx.set(i.valid, 1)
            ctx.set(i.p, {"mv": mv, "mant": mant, "e": e, "gamma_mant": gamma, "scale_exp": se})
            await ctx.tick().until(i.ready)
            ctx.set(i.valid, 0)
            ctx.set(i.p, {"mv": rng.randrange(2**31), "mant": rng.randrange(2**16),
                          "e": rng.randrange(64), "gamma_mant": rng.randrange(2**16),
                          "scale_exp": rng.randrange(-128, 128)})   # garbage after the edge

    async def monitor(ctx):
        i, o = dut.i_stream, dut.o_stream
        cycle = 0
        waiting = False
        async for _, _, iv, ir, ov in ctx.tick().sample(i.valid, i.ready, o.valid):
            cycle += 1
            if iv and ir:
                accepted_at.append(cycle)
                waiting = True
                assert not ov
            elif waiting and ov:
                latencies.append(cycle - accepted_at[-1])
                waiting = False

    async def consumer(ctx):
        nonlocal done
        o = dut.o_stream
        fields = ("sh", "qm", "qs", "recip", "s", "zs", "zb")
        for _ in cases:
            held = None
            while True:
                ready = rng.random() >= stall
                ctx.set(o.ready, ready)
                _, _, valid, payload = await ctx.tick().sample(o.valid, o.p)
                if valid:
                    got = {f: int(getattr(payload, f)) for f in fields}
                    assert held is None or got == held, "the result changed before it was taken"
                    held = got
                    if ready:
                        results.append(got)
                        break
                    assert ctx.get(o.valid), "valid dropped before the result was taken"
            ctx.set(o.ready, 0)
        done = True

    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.add_process(monitor)
    sim.run_until(1e-6 * (len(cases) * (BitLinearScalars.max_cycles + 40) + 100))
    assert done, "not every result came out"
    return results, latencies


@pytest.mark.parametrize("gap,stall", [(0.0, 0.0), (0.5, 0.5)])
def test_matches_reference(gap, stall):
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    cases = _cases(rng, 250)
    results, latencies = simulate(cases, gap=gap, stall=stall, seed=seed)
    assert len(results) == len(cases)
    for case, got, cyc in zip(cases, results, latencies):
        assert got == _expected(case), f"seed {seed}: {case}"
        assert cyc == scalars_cycles(case[0]), f"seed {seed}: {case}"
        assert cyc <= BitLinearScalars.max_cycles
    nonzero = [c for case, c in zip(cases, latencies) if case[0]]
    print(f"cycles: {min(latencies)} .. {max(latencies)} (mv != 0: {min(nonzero)} .. "
          f"{max(nonzero)}, mean {sum(nonzero) / len(nonzero):.1f}); "
          f"max_cycles {BitLinearScalars.max_cycles}")


def test_max_cycles():
    """max_cycles bounds scalars_cycles for every bit length of mv and is reached (mv = 0 and
    mv = 1 take the 30 normalizing shifts); both simulated."""
    worst = max(scalars_cycles(mv) for mv in [0] + [1 << b for b in range(MV_BITS)])
    assert worst == BitLinearScalars.max_cycles == 112
    cases = [(0, 2**16 - 1, 63, 2**16 - 1, 127), (1, 2**16 - 1, 0, 2**16 - 1, -128)]
    results, latencies = simulate(cases, stall=0.3, seed=1)
    assert results == [_expected(c) for c in cases]
    assert latencies == [BitLinearScalars.max_cycles] * 2
