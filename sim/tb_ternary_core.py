"""cocotb testbench of hdl/ternary_core.py (run from tests/test_ternary_core.py through
``run_cocotb``), plus the pure-Python beat generator both test levels use.

Parameters (``tb_params()``): ``lanes``, ``max_row``, ``acc_width``, ``seed``.
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from amaranth import signed
from amaranth.lib import data
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge

from mmfree.hdl.ternary_core import TernaryBeat
from mmfree.models import arith
from mmfree.models.boardfile import pack_trits
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.cocotb_streams import StreamSink, StreamSource

__all__ = ["ternary_beats", "expected_sums", "random_trits", "cycle_monitor"]


# --------------------------------------------------------------------------- pure Python helpers

def ternary_beats(trits, act, lanes: int) -> list[dict]:
    """Trit matrix T [rows, n] and activations A [n] → the core's input beats, group by group.

    The trit words come from the board file's own packing (``boardfile.pack_trits``): per row
    group and column j, bytes ``packed[g, j]`` little-endian, so lane k sits in bits 2k+1..2k.
    """
    packed = pack_trits(np.asarray(trits, dtype=np.int8), lanes)     # [groups, n, lanes/4]
    groups, n, _ = packed.shape
    return [{"trits": int.from_bytes(packed[g, j].tobytes(), "little"), "act": int(act[j]),
             "first": int(j == 0), "last": int(j == n - 1)}
            for g in range(groups) for j in range(n)]


def expected_sums(trits, act, lanes: int) -> list[list[int]]:
    """``arith.ternary_accumulate`` per row group; the padding rows of the last group are 0."""
    acc = arith.ternary_accumulate(trits, act)
    groups = -(-len(acc) // lanes)
    padded = np.zeros(groups * lanes, dtype=np.int64)
    padded[:len(acc)] = acc
    return [[int(v) for v in row] for row in padded.reshape(groups, lanes)]


def random_trits(rng: np.random.Generator, rows: int, n: int, p_zero: float | None = None,
                 p_plus: float | None = None) -> np.ndarray:
    """Random T; ``p_zero``/``p_plus`` bias the distribution (default: uniform over -1, 0, +1)."""
    if p_zero is None:
        return rng.integers(-1, 2, size=(rows, n), dtype=np.int8)
    p_plus = (1 - p_zero) / 2 if p_plus is None else p_plus
    p_minus = 1 - p_zero - p_plus
    return rng.choice(np.array([-1, 0, 1], np.int8), size=(rows, n), p=[p_minus, p_zero, p_plus])


# --------------------------------------------------------------------------- cocotb testbench

class TB:
    """Clock, reset, source and sink of one TernaryCore instance."""

    def __init__(self, dut, idle: float, stall: float, salt: int):
        p = tb_params()
        self.dut = dut
        self.lanes, self.max_row, self.acc_width = p["lanes"], p["max_row"], p["acc_width"]
        self.seed = p["seed"] * 1000 + salt
        dut._log.info(f"seed {self.seed}")
        self.np_rng = np.random.default_rng(self.seed)
        sums = data.ArrayLayout(signed(self.acc_width), self.lanes)
        self.src = StreamSource(dut, "i_stream", TernaryBeat(self.lanes), dut.clk, idle=idle,
                                rng=random.Random(self.seed))
        self.sink = StreamSink(dut, "o_stream", sums, dut.clk, stall=stall,
                               rng=random.Random(self.seed + 1))

    async def start(self):
        cocotb.start_soon(Clock(self.dut.clk, 10, unit="ns").start())
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 2)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)
        self.sink.start()

    async def run(self, cases):
        """Send every (T, A) case back to back; compare every group's sums with the golden
        model; then check that nothing more comes out."""
        beats, want = [], []
        for trits, act in cases:
            beats += ternary_beats(trits, act, self.lanes)
            want += expected_sums(trits, act, self.lanes)
        await self.src.send(beats)
        got = await self.sink.wait_for(len(want), timeout_cycles=20 * len(beats) + 100)
        for g, (w, o) in enumerate(zip(want, got)):
            assert o == w, f"group {g}: got {o}, want {w}"
        await ClockCycles(self.dut.clk, 20)
        extra = len(self.sink.items) - len(want)
        assert extra == 0, f"{extra} outputs beyond the expected ones"
        assert self.src.sent == len(beats)


async def cycle_monitor(dut, in_cycles: list, out_cycles: list) -> None:
    """Record the cycle numbers of every i_stream and o_stream transfer (cocotb)."""
    cycle = 0
    while True:
        await RisingEdge(dut.clk)
        if int(dut.i_stream__valid.value) and int(dut.i_stream__ready.value):
            in_cycles.append(cycle)
        if int(dut.o_stream__valid.value) and int(dut.o_stream__ready.value):
            out_cycles.append(cycle)
        cycle += 1


def _random_cases(tb: TB, count: int):
    rng, lanes = tb.np_rng, tb.lanes
    biases = [None, (0.0, None), (0.9, None), (0.1, 0.8), (0.1, 0.1)]
    cases = []
    for i in range(count):
        rows = int(rng.integers(1, 2 * lanes + 1))          # mostly not a multiple of lanes
        n = int(rng.integers(1, tb.max_row + 1)) if i % 3 else tb.max_row
        bias = biases[i % len(biases)]
        t = random_trits(rng, rows, n, *(bias or ()))
        a = rng.integers(-arith.ACT_MAX, arith.ACT_MAX + 1, size=n)
        cases.append((t, a))
    return cases


@cocotb.test()
@cocotb.parametrize(flow=[(0.0, 0.0), (0.3, 0.3), (0.1, 0.7)])
async def test_random_matrices(dut, flow):
    """Random and biased T, random A, idle gaps and back-pressure (idle, stall)."""
    tb = TB(dut, *flow, salt=int(flow[0] * 10 + flow[1] * 100))
    await tb.start()
    await tb.run(_random_cases(tb, 12))


@cocotb.test()
async def test_extremes_at_max_row(dut):
    """All +1, all -1, all 0, alternating, with A = ±127 over max_row columns: the sums
    reach ±127 · max_row exactly, the bound acc_width is derived from."""
    tb = TB(dut, 0.0, 0.3, salt=7)
    await tb.start()
    n, rows, amax = tb.max_row, tb.lanes, arith.ACT_MAX
    cases = []
    for fill in (1, -1, 0):
        for a in (amax, -amax):
            cases.append((np.full((rows, n), fill, np.int8), np.full(n, a)))
    alt = np.where(np.arange(n) % 2, -amax, amax)
    alt_trits = np.where(np.arange(n) % 2, -1, 1).astype(np.int8)
    cases.append((np.tile(alt_trits, (rows, 1)), alt))            # (-1)·(-127) + 1·127 + ...
    for trits, act in cases:                                # the extremes are really reached
        assert int(np.abs(arith.ternary_accumulate(trits, act)).max()) in (0, amax * n)
    await tb.run(cases)


@cocotb.test()
@cocotb.parametrize(n=[2, 5, 16])
async def test_back_to_back_no_bubble(dut, n):
    """Always-valid input and always-ready output: G groups of n columns take exactly G·n
    input cycles, and group g's sums transfer in cycle (g + 1)·n + 1 counted from the first
    input transfer (latency 2, see TernaryCore's docstring)."""
    tb = TB(dut, 0.0, 0.0, salt=100 + n)
    await tb.start()
    groups = 6
    t = random_trits(tb.np_rng, groups * tb.lanes, n)
    a = tb.np_rng.integers(-arith.ACT_MAX, arith.ACT_MAX + 1, size=n)
    in_cycles, out_cycles = [], []
    cocotb.start_soon(cycle_monitor(dut, in_cycles, out_cycles))
    await tb.run([(t, a)])
    first = in_cycles[0]
    assert in_cycles == list(range(first, first + groups * n)), "input bubble"
    assert [c - first for c in out_cycles] == [(g + 1) * n + 1 for g in range(groups)]
