# amaranth: UnusedElaboratable=no
"""Tests of hdl/valu.py: every output word and tag of the VALU against
``mmfree.firmware.valu.valu`` in the Amaranth simulator (seeded random operands plus the edge
cases of every mode, output kind and shift, every sigmoid input region, random input gaps and
output back-pressure), the exact latency, and absmax around a clear."""

import random

import pytest
from amaranth.sim import Simulator

from mmfree.firmware.valu import (A_BITS, B_BITS, C_BITS, M_BITS, S_BITS, TRUNC_MAX_SHIFT, Mode,
                                  Out, valu)
from mmfree.hdl.valu import VALU

SEED = 20260301
TAG_WIDTH = 4
A_MIN, A_MAX = -(1 << (A_BITS - 1)), (1 << (A_BITS - 1)) - 1
B_MIN, B_MAX = -(1 << (B_BITS - 1)), (1 << (B_BITS - 1)) - 1
M_MAX = (1 << M_BITS) - 1
C_MIN, C_MAX = -(1 << (C_BITS - 1)), (1 << (C_BITS - 1)) - 1
S_MAX = (1 << S_BITS) - 1

A_EDGE = [A_MIN, A_MIN + 1, -32769, -32768, -32767, -1, 0, 1, 32767, 32768, A_MAX - 1, A_MAX]
B_EDGE = [B_MIN, B_MIN + 1, -1, 0, 1, 2, B_MAX]
M_EDGE = [0, 1, 2, 32768, M_MAX]
C_EDGE = [C_MIN, -32769, -32768, -1, 0, 1, 32767, 32768, 65535, C_MAX]
S_EDGE = [0, 1, 2, 6, 7, 8, 9, 15, 16, 17, 23, 24, 31, 32, 40, 46, 47, 48, 49, 55, 56, 63]
SIG_EDGE = ([-32768, -32767, -16385, -16384, -16383, -16382, -1, 0, 1, 16382, 16383, 16384,
             16385, 32767] + [k * 64 + d for k in (-2, -1, 1, 2, 100, -100, 255, -255, 256, -256)
                              for d in (-1, 0, 1, 31, 32, 33)])


def _beat(a, b, m, c, s, mode, out, tag):
    return {"a": a, "b": b, "m": m, "c": c, "s": s, "mode": int(mode), "out": int(out), "tag": tag}


def _random_operand(rng, lo, hi, edges):
    r = rng.random()
    if r < 0.15:
        return rng.choice(edges)
    if r < 0.4:                                  # a random bit length: small values too
        bits = rng.randint(0, (hi - lo).bit_length() - 1)
        v = rng.randrange(1 << bits) if bits else 0
        v = -v if rng.random() < 0.5 else v
        return min(max(v, lo), hi)
    return rng.randint(lo, hi)


def valu_cases(rng: random.Random, count: int) -> list[dict]:
    """Edge combinations of every mode and output kind, then ``count`` random elements."""
    beats = []
    for mode in (Mode.ROUND, Mode.TRUNC):
        for s in S_EDGE:
            if mode == Mode.TRUNC and s > TRUNC_MAX_SHIFT:
                continue
            for a in A_EDGE:
                for b in (B_MIN, B_MAX, -1):
                    for mm in (M_MAX, 1):
                        beats.append(_beat(a, b, mm, rng.choice(C_EDGE), s, mode,
                                           rng.choice(list(Out)), 0))
    for a in A_EDGE:
        for b in B_EDGE:
            for mm in M_EDGE:
                for c in (C_MIN, 0, C_MAX):
                    beats.append(_beat(a, b, mm, c, rng.choice(S_EDGE), Mode.ROUND,
                                       rng.choice(list(Out)), 0))
    for x in SIG_EDGE:                          # the other fields are ignored: random junk
        beats.append(_beat(x, rng.randint(B_MIN, B_MAX), rng.randint(0, M_MAX),
                           rng.randint(C_MIN, C_MAX), rng.randint(0, S_MAX), Mode.SIGMOID,
                           rng.choice(list(Out)), 0))
    # halves and near-halves for ROUND/TRUNC/sigmoid-like products: p = c·2**(s-1) ± small
    for s in range(1, 17):
        for mode in (Mode.ROUND, Mode.TRUNC):
            for base in (1, 3, -1, -3):
                for d in (-1, 0, 1):
                    a = base * (1 << (s - 1)) + d
                    if A_MIN <= a <= A_MAX:
                        beats.append(_beat(a, 1, 1, rng.choice(C_EDGE), s, mode,
                                           rng.choice(list(Out)), 0))
    for _ in range(count):
        mode = rng.choice([Mode.ROUND, Mode.ROUND, Mode.TRUNC, Mode.SIGMOID])
        if mode == Mode.SIGMOID:
            a = rng.randint(-(1 << 15), (1 << 15) - 1)
            if rng.random() < 0.5:
                a = rng.randint(-(1 << 14) - 64, (1 << 14) + 64)
        else:
            a = _random_operand(rng, A_MIN, A_MAX, A_EDGE)
        s = rng.randint(0, TRUNC_MAX_SHIFT if mode == Mode.TRUNC else S_MAX)
        if mode == Mode.ROUND and rng.random() < 0.5:
            s = rng.randint(0, 40)
        beats.append(_beat(a, _random_operand(rng, B_MIN, B_MAX, B_EDGE),
                           _random_operand(rng, 0, M_MAX, M_EDGE),
                           _random_operand(rng, C_MIN, C_MAX, C_EDGE), s, mode,
                           rng.choice(list(Out)), 0))
    for i, beat in enumerate(beats):
        beat["tag"] = rng.randrange(1 << TAG_WIDTH)
    return beats


def expected(beat) -> int:
    y = valu(beat["a"], beat["b"], beat["m"], beat["c"], beat["s"], Mode(beat["mode"]),
             Out(beat["out"]))
    return y & 0xFFFF


def _run(dut, beats, idle, stall, seed, clears=()):
    """Streams ``beats`` through ``dut`` (random idle cycles / back-pressure); returns the
    output words as ``(y, tag, cycle)`` and the absmax samples taken at each ``clears``
    index (before that beat is sent)."""
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []
    cycle = [0]
    sent = []

    async def counter(ctx):
        async for _ in ctx.tick():
            cycle[0] += 1

    async def source(ctx):
        rng = random.Random(seed)
        for beat in beats:
            while idle and rng.random() < idle:
                await ctx.tick()
            ctx.set(dut.i_stream.payload, beat)
            ctx.set(dut.i_stream.valid, 1)
            await ctx.tick().until(dut.i_stream.ready)
            sent.append(cycle[0] - 1)
            ctx.set(dut.i_stream.valid, 0)

    async def sink(ctx):
        rng = random.Random(seed + 1)
        while len(got) < len(beats):
            ctx.set(dut.o_stream.ready, 0 if (stall and rng.random() < stall) else 1)
            await ctx.tick()
        ctx.set(dut.o_stream.ready, 0)

    async def monitor(ctx):
        async for clk_edge, rst, valid, ready, y, tag in ctx.tick().sample(
                dut.o_stream.valid, dut.o_stream.ready, dut.o_stream.p.y, dut.o_stream.p.tag):
            if valid and ready:
                got.append((y, tag, cycle[0] - 1))

    sim.add_testbench(counter, background=True)
    sim.add_testbench(monitor, background=True)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return got, sent


@pytest.mark.parametrize("idle,stall", [(0.0, 0.0), (0.3, 0.4)], ids=["smooth", "gaps"])
def test_valu_matches_firmware(idle, stall):
    seed = SEED + int(idle * 10)
    print("seed", seed)
    beats = valu_cases(random.Random(seed), 2000)
    got, sent = _run(VALU(TAG_WIDTH), beats, idle, stall, seed)
    assert len(got) == len(beats)
    bad = [(b, expected(b), y) for b, (y, tag, _) in zip(beats, got)
           if y != expected(b) or tag != b["tag"]]
    assert not bad[:10], f"{len(bad)} mismatches, first: {bad[:10]}"


def test_valu_sigmoid_sweep():
    """SIGMOID over every 5th int16 input and around every table boundary (k·64 ± 1 for both
    signs), with random junk in the ignored fields, back to back."""
    rng = random.Random(SEED + 7)
    print("seed", SEED + 7)
    xs = sorted(set(list(range(-(1 << 15), 1 << 15, 5))
                    + [k * 64 + d for k in range(-257, 258) for d in (-1, 0, 1)
                       if -(1 << 15) <= k * 64 + d < 1 << 15]))
    beats = [_beat(x, rng.randint(B_MIN, B_MAX), rng.randint(0, M_MAX), rng.randint(C_MIN, C_MAX),
                   rng.randint(0, S_MAX), Mode.SIGMOID, rng.choice(list(Out)),
                   rng.randrange(1 << TAG_WIDTH)) for x in xs]
    got, _ = _run(VALU(TAG_WIDTH), beats, 0.0, 0.0, SEED)
    bad = [(b["a"], expected(b), y) for b, (y, tag, _) in zip(beats, got)
           if y != expected(b) or tag != b["tag"]]
    assert len(got) == len(beats) and not bad[:10], f"{len(bad)} mismatches: {bad[:10]}"


JUNK = _beat((1 << 16) - 1, (1 << 15) - 1, 1, 0, 0, Mode.ROUND, Out.SAT16, 0)   # |p| < 2**31


def _cycle_run(dut, schedule, cycles):
    """Drives ``schedule`` ({cycle: beat or 'clear'}) with the output always ready; returns
    per cycle (accepted beat index or None, (y, tag) when o_stream.valid, absmax, busy). In
    cycles without a beat the payload is junk whose |a·b·m| exceeds every real one (a unit
    that looked at it would show it in absmax)."""
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    trace = []

    async def tb(ctx):
        ctx.set(dut.o_stream.ready, 1)
        for n in range(cycles):
            item = schedule.get(n)
            beat = item[0] if item else None
            ctx.set(dut.absmax_clear, 1 if item and item[1] else 0)
            ctx.set(dut.i_stream.valid, 1 if beat else 0)
            ctx.set(dut.i_stream.payload, beat if beat else JUNK)
            _, _, ready, ov, oy, otag, amax, busy = await ctx.tick().sample(
                dut.i_stream.ready, dut.o_stream.valid, dut.o_stream.p.y, dut.o_stream.p.tag,
                dut.absmax, dut.busy)
            assert ready                                      # never back-pressured here
            trace.append((beat, (oy, otag) if ov else None, amax, busy))

    sim.add_testbench(tb)
    sim.run()
    return trace


def test_valu_latency_exact():
    """Elements alone and back to back: o_stream.valid exactly ``latency`` cycles after the
    accepting cycle, busy from the cycle after acceptance until the output is taken."""
    dut = VALU(TAG_WIDTH)
    assert dut.latency == 6
    rng = random.Random(SEED + 3)
    starts = [2, 20, 21, 22, 23, 40]
    beats = {n: (_beat(rng.randint(A_MIN, A_MAX), rng.randint(B_MIN, B_MAX), rng.randint(0, M_MAX),
                       rng.randint(C_MIN, C_MAX), rng.randint(0, 40), Mode.ROUND, Out.SAT16, i % 16),
                 False) for i, n in enumerate(starts)}
    trace = _cycle_run(dut, beats, 60)
    out_cycles = [n for n, (_, o, _, _) in enumerate(trace) if o is not None]
    assert out_cycles == [n + dut.latency for n in starts]
    for n in starts:
        assert trace[n + dut.latency][1] == (expected(beats[n][0]), beats[n][0]["tag"])
    busy = [n for n, t in enumerate(trace) if t[3]]
    assert busy == sorted({n + d for n in starts for d in range(1, dut.latency + 1)})


def test_valu_absmax_with_clear():
    """absmax = max|a·b| over a pass of int16 a, b (m = 1), cleared between two passes (once
    while idle, once in the cycle the second pass's first element is accepted); it is final
    in the cycle the pass's last o_stream.valid rises."""
    rng = random.Random(SEED + 4)
    print("seed", SEED + 4)
    i16 = lambda: rng.randint(-(1 << 15), (1 << 15) - 1)
    pass1 = [(i16(), i16()) for _ in range(300)] + [(-32768, -32768)] + [(i16(), i16()) for _ in range(20)]
    pass2 = [(rng.randint(-3000, 3000), rng.randint(-3000, 3000)) for _ in range(200)]
    pass3 = [(rng.randint(-300, 300), rng.randint(-300, 300)) for _ in range(100)]
    schedule, n = {}, 3
    schedule[1] = (None, True)
    ends = []
    for k, pairs in enumerate((pass1, pass2, pass3)):
        for i, (a, b) in enumerate(pairs):
            clear = k == 2 and i == 0          # clear in the accepting cycle of pass 3's first
            schedule[n] = (_beat(a, b, 1, 0, 0, Mode.ROUND, Out.SAT16, 0), clear)
            n += 1
        ends.append(n - 1)
        n += 7                                 # the pass's last output is read first
        if k == 0:
            n += 3
            schedule[n] = (None, True)         # clear while idle
            n += 3
    trace = _cycle_run(VALU(TAG_WIDTH), schedule, n + 10)
    for end, pairs in zip(ends, (pass1, pass2, pass3)):
        want = max(abs(a * b) for a, b in pairs)
        assert trace[end + 6][1] is not None
        assert trace[end + 6][2] == want, (end, trace[end + 6][2], want)
    assert trace[ends[0] + 6][2] == 1 << 30
    assert trace[ends[0] + 12][2] == 0                      # after the idle clear


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4"])
def test_valu_rejects_bad_tag_width(bad):
    with pytest.raises(ValueError, match=r"tag_width must be an integer >= 1"):
        VALU(bad)
