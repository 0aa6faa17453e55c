"""Amaranth-simulator tests of hdl/primitives.py."""

import random

import pytest
from amaranth import Module, Signal
from amaranth.sim import Simulator

from mmfree.hdl.primitives import SeqDivider, bit_length
from mmfree.sim.amaranth_streams import stream_get, stream_put


@pytest.mark.parametrize("nw,dw", [(8, 4), (30, 15), (42, 13)])
def test_divider_matches_python(nw, dw):
    seed = 1000 + nw
    print("seed", seed)
    rng = random.Random(seed)
    cases = [((1 << nw) - 1, 1), ((1 << nw) - 1, (1 << dw) - 1), (0, 1), (5, 7), (1 << (nw - 1), 3)]
    cases += [(rng.getrandbits(nw), rng.randint(1, (1 << dw) - 1)) for _ in range(40)]
    dut = SeqDivider(nw, dw)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    latencies = []

    async def tb(ctx):
        for n, d in cases:
            await stream_put(ctx, dut.i_stream, {"dividend": n, "divisor": d})
            start = 0
            while not ctx.get(dut.o_stream.valid):
                await ctx.tick()
                start += 1
            latencies.append(start)
            out = await stream_get(ctx, dut.o_stream)
            assert (out.quotient, out.remainder) == (n // d, n % d), (n, d)

    sim.add_testbench(tb)
    sim.run()
    assert set(latencies) == {nw}    # nw cycles after the accepting edge (docstring: nw + 1 incl. it)


def test_divider_rejects_bad_width():
    with pytest.raises(ValueError, match="at least 1 bit"):
        SeqDivider(0, 4)


def test_bit_length():
    m = Module()
    value = Signal(12)
    out = bit_length(m, value)
    sim = Simulator(m)

    async def tb(ctx):
        for v in [0, 1, 2, 3, 255, 256, 4095] + list(range(0, 4096, 97)):
            ctx.set(value, v)
            assert ctx.get(out) == v.bit_length()

    sim.add_testbench(tb)
    sim.run()
