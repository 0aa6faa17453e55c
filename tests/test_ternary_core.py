# amaranth: UnusedElaboratable=no
"""Tests of hdl/ternary_core.py: Amaranth-simulator tests here, cocotb + Icarus tests in
sim/tb_ternary_core.py (run at the bottom). Every output group is compared with
``arith.ternary_accumulate`` over beats built from the board file's trit packing."""

import itertools
import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree.hdl.ternary_core import TernaryCore
from mmfree.models import arith
from mmfree.sim.amaranth_streams import stream_get_all, stream_put_all
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb
from mmfree.sim.tb_ternary_core import expected_sums, random_trits, ternary_beats

AMAX = arith.ACT_MAX


def add_watchdog(sim, cycles: int) -> None:
    """Fail instead of hanging when a handshake never completes."""
    async def watchdog(ctx):
        for _ in range(cycles):
            await ctx.tick()
        raise AssertionError(f"simulation still running after {cycles} cycles")
    sim.add_testbench(watchdog, background=True)


def run_groups(dut, beats, n_groups, *, idle=0.0, stall=0.0, seed=0, monitor=None):
    """Stream ``beats`` into ``dut`` and collect ``n_groups`` outputs (lists of ints); then run
    20 more cycles and check that no further output appears. ``monitor(in_cycles,
    out_cycles)`` receives the cycle numbers of every transfer when given."""
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got, in_cycles, out_cycles, extra = [], [], [], []

    async def source(ctx):
        await stream_put_all(ctx, dut.i_stream, beats, idle=idle, rng=random.Random(seed))

    async def sink(ctx):
        out = await stream_get_all(ctx, dut.o_stream, n_groups, stall=stall,
                                   rng=random.Random(seed + 1))
        got.extend([int(v) for v in o] for o in out)
        ctx.set(dut.o_stream.ready, 1)
        for _ in range(20):
            await ctx.tick()
            extra.append(ctx.get(dut.o_stream.valid))

    async def watch(ctx):
        for cycle in itertools.count():
            _, _, iv, ir, ov, orr = await ctx.tick().sample(
                dut.i_stream.valid, dut.i_stream.ready, dut.o_stream.valid, dut.o_stream.ready)
            if iv and ir:
                in_cycles.append(cycle)
            if ov and orr:
                out_cycles.append(cycle)

    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.add_testbench(watch, background=True)
    add_watchdog(sim, 20 * len(beats) + 200)
    sim.run()
    assert len(in_cycles) == len(beats)
    assert not any(extra), "output after the last expected group"
    if monitor:
        monitor(in_cycles, out_cycles)
    return got


def check_cases(dut, cases, **kw):
    beats, want = [], []
    for trits, act in cases:
        beats += ternary_beats(trits, act, dut.lanes)
        want += expected_sums(trits, act, dut.lanes)
    got = run_groups(dut, beats, len(want), **kw)
    for g, (w, o) in enumerate(zip(want, got)):
        assert o == w, f"group {g}: got {o}, want {w}"


# --------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("lanes", [0, 4, 6, 10, 66, 68, 128, 8.0, "8"])
def test_rejects_bad_lanes(lanes):
    with pytest.raises(ValueError, match=r"lanes must be a multiple of 4 from 8 to 64 \(4 trits"):
        TernaryCore(lanes, 64)


@pytest.mark.parametrize("max_row", [0, -5, 1.5])
def test_rejects_bad_max_row(max_row):
    with pytest.raises(ValueError, match="max_row must be the longest row in input columns"):
        TernaryCore(8, max_row)


def test_rejects_small_acc_width():
    with pytest.raises(ValueError) as err:
        TernaryCore(8, 512, acc_width=12)
    assert str(err.value) == "acc_width 12 cannot hold 127 x 512 = 65024; use at least 17"
    with pytest.raises(ValueError, match="19 cannot hold 127 x 4096 = 520192; use at least 20"):
        TernaryCore(32, 4096, acc_width=19)


@pytest.mark.parametrize("max_row", [1, 2, 64, 258, 259, 512, 516, 4096])
def test_acc_width_is_the_smallest_that_cannot_overflow(max_row):
    width = TernaryCore(8, max_row).acc_width
    bound = AMAX * max_row
    assert bound <= 2 ** (width - 1) - 1            # holds ±127·max_row
    assert bound > 2 ** (width - 2) - 1             # one bit fewer would not
    assert TernaryCore(8, max_row, acc_width=width).acc_width == width
    assert TernaryCore(8, max_row, acc_width=width + 3).acc_width == width + 3


def test_known_widths():
    assert TernaryCore(8, 512).acc_width == 17      # docs/arithmetic.md: 17 bits for in = 512
    assert TernaryCore(8, 4096).acc_width == 20


# --------------------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("lanes,idle,stall",
                         [(8, 0.3, 0.4), (16, 0.0, 0.0), (32, 0.2, 0.6), (64, 0.3, 0.3)])
def test_random_matrices_match_golden(lanes, idle, stall):
    seed = 17 * lanes + int(idle * 10)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    max_row = 40
    dut = TernaryCore(lanes, max_row)
    cases = []
    for i, bias in enumerate([None, (0.0, None), (0.95, None), (0.1, 0.85), (0.1, 0.05), None]):
        rows = int(rng.integers(1, 2 * lanes + 1)) if i else 2 * lanes - 3   # rarely a multiple
        n = max_row if i == 0 else int(rng.integers(1, max_row + 1))
        cases.append((random_trits(rng, rows, n, *(bias or ())),
                      rng.integers(-AMAX, AMAX + 1, size=n)))
    check_cases(dut, cases, idle=idle, stall=stall, seed=seed)


@pytest.mark.parametrize("lanes,max_row", [(8, 258), (64, 64)])
def test_extremes_at_max_row(lanes, max_row):
    """±127 · max_row exactly, at the derived acc_width: 127 · 258 = 32766 needs all 16 bits.
    (max_row = 4096 runs under Icarus, below.)"""
    dut = TernaryCore(lanes, max_row)
    n = max_row
    cases = [(np.full((lanes, n), fill, np.int8), np.full(n, a))
             for fill in (1, -1, 0) for a in (AMAX, -AMAX)]
    sums = [arith.ternary_accumulate(t, a) for t, a in cases]
    assert {int(s.max()) for s in sums} == {AMAX * n, -AMAX * n, 0}
    assert AMAX * n > 2 ** (dut.acc_width - 2)       # the top bit of the accumulator is used
    check_cases(dut, cases, stall=0.3, seed=lanes)


def test_padding_rows_are_zero():
    """Rows not a multiple of lanes: the padding lanes of the last group give 0 sums."""
    lanes, rows, n = 16, 21, 9
    rng = np.random.default_rng(5)
    t = np.ones((rows, n), np.int8)
    a = rng.integers(1, AMAX + 1, size=n)
    dut = TernaryCore(lanes, n)
    got = run_groups(dut, ternary_beats(t, a, lanes), 2)
    assert got[0] == [int(a.sum())] * lanes
    assert got[1] == [int(a.sum())] * (rows - lanes) + [0] * (2 * lanes - rows)


def test_invalid_code_counts_as_zero():
    """The code 10 never occurs in a board file; the core treats it as 0. Lane k of a word is
    bits 2k+1..2k (the board file's packing)."""
    lanes = 8
    words = [0b10_01_11_00_10_10_01_11, 0b01_10_10_10_11_01_10_00]
    acts = [100, -37]
    beats = [{"trits": w, "act": a, "first": int(j == 0), "last": int(j == 1)}
             for j, (w, a) in enumerate(zip(words, acts))]
    decode = {0b00: 0, 0b01: 1, 0b11: -1, 0b10: 0}
    t = np.array([[decode[(w >> (2 * k)) & 3] for w in words] for k in range(lanes)])
    got = run_groups(TernaryCore(lanes, 2), beats, 1)
    assert got == [[int(v) for v in arith.ternary_accumulate(t, acts)]]


# --------------------------------------------------------------------------- timing and flow

@pytest.mark.parametrize("lanes,n", [(8, 2), (16, 3), (32, 7)])
def test_back_to_back_groups_have_no_bubble(lanes, n):
    """Always valid, always ready: input transfers in every cycle and group g's sums transfer
    in cycle (g + 1)·n + 1 after the first input transfer (latency 2)."""
    groups = 5
    rng = np.random.default_rng(n)
    t = random_trits(rng, groups * lanes, n)
    a = rng.integers(-AMAX, AMAX + 1, size=n)

    def timing(in_cycles, out_cycles):
        first = in_cycles[0]
        assert in_cycles == list(range(first, first + groups * n)), "input bubble"
        assert [c - first for c in out_cycles] == [(g + 1) * n + 1 for g in range(groups)]
        assert out_cycles[-1] - first == groups * n + TernaryCore.latency - 1

    check_cases(TernaryCore(lanes, n), [(t, a)], monitor=timing)


def test_single_column_groups_run_at_half_rate():
    """Groups of one column (first = last) take 2 cycles each after the first two: the ready
    rule uses registers only, so a last beat waits while the output register is full even in
    the cycle it is taken (documented)."""
    lanes, groups = 8, 6
    rng = np.random.default_rng(9)
    t = random_trits(rng, groups * lanes, 1)
    a = np.array([-AMAX])

    def timing(in_cycles, out_cycles):
        rel = [c - in_cycles[0] for c in in_cycles]
        assert rel == [0] + [2 * g - 1 for g in range(1, groups)]
        assert [c - in_cycles[0] for c in out_cycles] == [2 * g + 2 for g in range(groups)]

    check_cases(TernaryCore(lanes, 1), [(t, a)], monitor=timing)


def test_back_pressure_holds_two_groups():
    """With the output never taken the core accepts exactly two groups (one waits in the
    output register, one complete in the accumulators), then drops ready and holds it low;
    once the output is taken both groups come out intact and the stream continues."""
    lanes, n, groups = 8, 4, 4
    rng = np.random.default_rng(3)
    t = random_trits(rng, groups * lanes, n)
    a = rng.integers(-AMAX, AMAX + 1, size=n)
    beats, want = ternary_beats(t, a, lanes), expected_sums(t, a, lanes)
    dut = TernaryCore(lanes, n)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []

    async def tb(ctx):
        ctx.set(dut.o_stream.ready, 0)
        accepted = 0
        ctx.set(dut.i_stream.valid, 1)
        for _ in range(30):
            ctx.set(dut.i_stream.payload, beats[accepted])
            _, _, ready = await ctx.tick().sample(dut.i_stream.ready)
            accepted += ready
        assert accepted == 2 * n
        assert not ctx.get(dut.i_stream.ready)
        ctx.set(dut.i_stream.valid, 0)
        got.extend([int(v) for v in o] for o in await stream_get_all(ctx, dut.o_stream, 2))
        await stream_put_all(ctx, dut.i_stream, beats[accepted:])     # fits: two groups again
        got.extend([int(v) for v in o] for o in await stream_get_all(ctx, dut.o_stream, groups - 2))

    sim.add_testbench(tb)
    add_watchdog(sim, 500)
    sim.run()
    assert got == want


def test_first_restarts_and_last_clears():
    """A group cut short by a new ``first`` (no ``last``) is abandoned; a group after a ``last``
    starts from 0 even without ``first``; first = last on one beat is a one-column group."""
    lanes, n = 8, 6
    rng = np.random.default_rng(11)
    t = random_trits(rng, 3 * lanes, n)
    a = rng.integers(-AMAX, AMAX + 1, size=n)
    beats = ternary_beats(t, a, lanes)
    want = expected_sums(t, a, lanes)
    aborted = [dict(b, last=0) for b in beats[n:n + 4]]          # half of group 1, no last
    no_first = [dict(b, first=0) for b in beats[2 * n:]]         # group 2 without first
    one_col = ternary_beats(t[:, :1], a[:1], lanes)
    stream = beats[:n] + aborted + beats[n:2 * n] + no_first + one_col
    want = want + expected_sums(t[:, :1], a[:1], lanes)
    for idle, stall in [(0.0, 0.0), (0.4, 0.4)]:
        got = run_groups(TernaryCore(lanes, n), stream, len(want), idle=idle, stall=stall, seed=4)
        assert got == want


# --------------------------------------------------------------------------- cocotb + Icarus

@pytest.mark.skipif(not icarus_available(), reason=ICARUS_MISSING)
@pytest.mark.parametrize("lanes", [8, 16, 32])
def test_cocotb(lanes, tmp_path):
    seed = 2024 + lanes
    print("seed", seed)
    max_row = 64
    core = TernaryCore(lanes, max_row)
    run_cocotb(core, f"ternary_core_{lanes}", "mmfree.sim.tb_ternary_core", tmp_path,
               params={"lanes": lanes, "max_row": max_row, "acc_width": core.acc_width,
                       "seed": seed},
               seed=seed)


@pytest.mark.skipif(not icarus_available(), reason=ICARUS_MISSING)
def test_cocotb_extremes_at_4096(tmp_path):
    """127 · 4096 = 520192 fills all 20 bits of the derived acc_width."""
    core = TernaryCore(8, 4096)
    assert core.acc_width == 20
    run_cocotb(core, "ternary_core_4096", "mmfree.sim.tb_ternary_core", tmp_path,
               params={"lanes": 8, "max_row": 4096, "acc_width": core.acc_width, "seed": 1},
               seed=1, testcase="test_extremes_at_max_row")


@pytest.mark.parametrize("lanes,idle,stall", [(8, 0.3, 0.4), (16, 0.0, 0.0), (16, 0.2, 0.5)])
def test_serial_output_with_flush(lanes, idle, stall):
    """``serial=True``: each group's sums come one per transfer, row 0 first; a ``flush`` after
    the last real row of a partial group drops its padding rows (the sequencer's drain). Every
    sum against arith.ternary_accumulate, with input gaps and output back-pressure, and the
    core keeps accumulating the next groups meanwhile."""
    seed = 31 * lanes + int(10 * stall)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    dut = TernaryCore(lanes, 40, serial=True)
    beats, want = [], []
    for _ in range(5):
        rows, n = int(rng.integers(1, 3 * lanes)), int(rng.integers(1, 41))
        trits, act = random_trits(rng, rows, n), rng.integers(-AMAX, AMAX + 1, size=n)
        beats += ternary_beats(trits, act, lanes)
        for k, group in enumerate(expected_sums(trits, act, lanes)):
            real = min(lanes, rows - k * lanes)
            want.append(group[:real])              # flush after the real rows
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []

    async def source(ctx):
        await stream_put_all(ctx, dut.i_stream, beats, idle=idle, rng=random.Random(seed))

    async def sink(ctx):
        r = random.Random(seed + 1)
        for group in want:
            sums = []
            while len(sums) < len(group):
                ready = r.random() >= stall
                last = len(sums) == len(group) - 1
                ctx.set(dut.o_stream.ready, ready)
                ctx.set(dut.flush, ready and last and len(group) < lanes)
                _, _, valid, value = await ctx.tick().sample(dut.o_stream.valid, dut.o_stream.payload)
                if valid and ready:
                    sums.append(int(value))
            ctx.set(dut.o_stream.ready, 0)
            ctx.set(dut.flush, 0)
            got.append(sums)

    sim.add_testbench(source)
    sim.add_testbench(sink)
    add_watchdog(sim, 20000)
    sim.run()
    assert got == want
