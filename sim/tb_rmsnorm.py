"""cocotb testbenches of hdl/rmsnorm.py (run from tests/test_rmsnorm.py through ``run_cocotb``),
plus the pure-Python case generators that both test levels use.

One cocotb test per component, selected with ``run_cocotb(..., testcase=...)``:
``irsqrt_sweep`` (IRSqrt), ``norm_stats`` (NormStats), ``norm_apply`` (NormApply),
``rmsnorm`` (RMSNorm). Each runs its cases twice: back to back with the output always ready
(checking the documented latency and throughput cycle by cycle), then with random idle cycles
on the inputs and random back-pressure on the output. Every output word is compared with
``mmfree.models.arith`` (irsqrt, norm_stats, rmsnorm).

Parameters (``tb_params()``): ``seed``, ``u_width`` (IRSqrt), ``max_n`` (NormStats,
RMSNorm), ``count`` (how many random cases where that applies).
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from amaranth import signed, unsigned
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge

from mmfree.hdl.rmsnorm import (EPS_BITS, ApplyBeat, NormApply, NormBeat, StatsBeat, StatsResult,
                                irsqrt_latency, stats_latency)
from mmfree.models import arith
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.cocotb_streams import StreamSink, StreamSource, pack, unpack

__all__ = ["irsqrt_values", "stats_cases", "apply_cases", "mant_cases", "rmsnorm_cases",
           "stats_beats", "apply_beats", "norm_beats", "EPS_MAX"]

EPS_MAX = (1 << EPS_BITS) - 1
I16_MIN, I16_MAX = -(1 << 15), (1 << 15) - 1


# --------------------------------------------------------------------------- case generators

def irsqrt_values(rng: random.Random, u_width: int, count: int) -> list[int]:
    """The edge values of the brief that fit ``u_width`` bits, both ends of every bit length
    (so every normalization shift occurs), perfect squares and their neighbours at every
    shift (where a wrong truncation in the normalizer or a wrong square-root digit changes
    ``q``), and ``count`` random values of random bit length."""
    top = (1 << u_width) - 1
    edges = [1, 2, 3, (1 << 28) - 1, 1 << 28, (1 << 30) - 1, 1 << 30, 1 << 42, (1 << 62) - 1]
    values = [u for u in edges if u <= top]
    for b in range(1, u_width + 1):
        values += [1 << (b - 1), (1 << b) - 1, rng.randrange(1 << (b - 1), 1 << b)]
    for bits in range(1, 16):                   # r² - 1, r², r² + 1: isqrt steps by one here
        r = rng.randrange(1 << (bits - 1), 1 << bits)
        values += [r * r - 1, r * r, r * r + 1]
    for t in range(1, max(u_width - 29, 1)):    # un = q² after a right shift, or q² - 1
        q = rng.randrange(1 << 14, 1 << 15) | 1
        values += [(q * q) << t, ((q * q) << t) - 1, ((q * q) << t) + rng.randrange(1 << t)]
    values = [u for u in values if 1 <= u <= top]
    values += [rng.randrange(1 << (b - 1), 1 << b)
               for b in (rng.randint(1, u_width) for _ in range(count))]
    return values


def _vector(rng: np.random.Generator, n: int, bits: int | None = None) -> np.ndarray:
    """int16 vector of length n, uniform in ±2**bits (full int16 range when bits is None)."""
    if bits is None:
        return rng.integers(I16_MIN, I16_MAX + 1, n)
    return np.clip(rng.integers(-(1 << bits), (1 << bits) + 1, n), I16_MIN, I16_MAX)


def stats_cases(seed: int, max_n: int, count: int) -> list[tuple[np.ndarray, int]]:
    """``(x, eps_q)`` pairs for NormStats: random vectors of lengths 1, 2, 7, 128, max_n (those
    <= max_n); the all-zero vector (u = eps_q); -32768 and 32767 everywhere at length max_n
    (the widest sum of squares); a single non-zero element; eps_q 1 and 2**32 - 1; u of every
    bit length 1..33 (every normalization shift of irsqrt: tiny sums shift left, huge ones
    right); vectors of every magnitude 2**0..2**15; then ``count`` random ones."""
    rng = np.random.default_rng(seed)
    cases = []
    for n in sorted({1, 2, 7, 128, max_n}):
        if n <= max_n:
            cases.append((_vector(rng, n), int(rng.integers(1, 1000))))
    short = min(5, max_n)
    cases += [
        (np.zeros(short, np.int64), 1),
        (np.zeros(max_n, np.int64), 1),
        (np.zeros(short, np.int64), EPS_MAX),
        (np.full(max_n, I16_MIN), 1),
        (np.full(max_n, I16_MAX), 1),
        (np.full(max_n, I16_MIN), EPS_MAX),              # u = 2**30 + 2**32 - 1: 33 bits
        (_vector(rng, max_n), EPS_MAX),
        (_vector(rng, min(16, max_n)), 1),
        (np.array([1]), 1),                              # u = 2
        (np.array([I16_MIN]), 1),
    ]
    for value in (I16_MIN, I16_MAX, 1, -1, int(rng.integers(I16_MIN, I16_MAX))):
        x = np.zeros(min(16, max_n), np.int64)
        x[int(rng.integers(0, len(x)))] = value
        cases.append((x, 1))
    for b in range(1, EPS_BITS + 1):                     # u = eps_q of bit length b
        cases.append((np.zeros(int(rng.integers(1, min(4, max_n) + 1)), np.int64),
                      int(rng.integers(1 << (b - 1), 1 << b))))
    for bits in range(16):
        cases.append((_vector(rng, int(rng.integers(1, max_n + 1)), bits), 1))
    for _ in range(count):
        n = int(rng.integers(1, max_n + 1))
        bits = None if rng.random() < 0.5 else int(rng.integers(0, 16))
        eps = int(rng.integers(1, 1 << int(rng.integers(1, EPS_BITS + 1))))
        cases.append((_vector(rng, n, bits), eps))
    return cases


def apply_cases(seed: int, max_len: int = 24) -> list[dict]:
    """Vectors for NormApply driven with their own statistics: for every shift 0..63, a random
    vector (random length, magnitude and eps_q) with random weights and ``w_frac``, and
    ``out_frac`` chosen so that ``shift = e + w_frac - out_frac`` is that value; plus
    saturating extremes (x = w = -32768, x = -32768 with w = 32767). ``expected`` is
    ``arith.rmsnorm`` of the case."""
    rng = np.random.default_rng(seed)
    specs = [(s, None, None) for s in range(64)]
    specs += [(s, I16_MIN, I16_MIN) for s in (0, 1, 17, 30, 46, 47, 63)]
    specs += [(s, I16_MIN, I16_MAX) for s in (0, 1, 17, 30, 46, 47, 63)]
    cases = []
    for shift, xv, wv in specs:
        n = int(rng.integers(1, max_len + 1))
        if xv is None:
            bits = None if rng.random() < 0.3 else int(rng.integers(0, 16))
            x, w = _vector(rng, n, bits), _vector(rng, n, None if rng.random() < 0.5 else 12)
        else:
            x, w = np.full(n, xv), np.full(n, wv)
        eps_q = int(rng.integers(1, 1 << int(rng.integers(1, 20))))
        mant, e = arith.norm_stats(x, eps_q)
        w_frac = int(rng.integers(0, 16))
        out_frac = e + w_frac - shift
        cases.append({"x": x, "w": w, "mant": mant, "shift": shift, "e": e, "eps_q": eps_q,
                      "w_frac": w_frac, "out_frac": out_frac,
                      "expected": arith.rmsnorm(x, w, w_frac, out_frac, eps_q)})
    return cases


def mant_cases(seed: int, count: int = 12, length: int = 16) -> list[dict]:
    """NormApply with mantissas that irsqrt never gives (0, 1, 2**15 - 1, random below 2**15)
    and its extremes, at random shifts: ``expected = sat16(rshift_round(x · w · mant, shift))``
    with ``arith``'s functions (the formula of ``arith.rmsnorm``)."""
    rng = np.random.default_rng(seed)
    mants = [0, 1, (1 << 15) - 1, 1 << 15, (1 << 16) - 1]
    mants += [int(rng.integers(0, 1 << 16)) for _ in range(count - len(mants))]
    cases = []
    for mant in mants:
        x, w = _vector(rng, length), _vector(rng, length)
        shift = int(rng.integers(0, 64))
        cases.append({"x": x, "w": w, "mant": mant, "shift": shift,
                      "expected": arith.sat16(arith.rshift_round(
                          np.asarray(x, np.int64) * np.asarray(w, np.int64) * mant, shift))})
    return cases


def rmsnorm_cases(seed: int, max_n: int, count: int) -> list[dict]:
    """Whole RMSNorms for the wrapper: random and extreme vectors with random weights,
    ``w_frac``/``out_frac`` with ``frac_diff`` in [-16, 15] and a shift in 0..63.
    ``expected = arith.rmsnorm(...)``."""
    rng = np.random.default_rng(seed)
    vectors = [np.zeros(min(3, max_n), np.int64), np.full(max_n, I16_MIN), _vector(rng, 1)]
    vectors += [_vector(rng, int(rng.integers(1, max_n + 1)),
                        None if rng.random() < 0.3 else int(rng.integers(0, 16)))
                for _ in range(count)]
    cases = []
    for x in vectors:
        w = _vector(rng, len(x), None if rng.random() < 0.5 else 13)
        eps_q = int(rng.integers(1, 1 << int(rng.integers(1, 24))))
        mant, e = arith.norm_stats(x, eps_q)
        frac_diff = int(rng.integers(max(-16, -e), 16))
        w_frac = int(rng.integers(0, 16))
        out_frac = w_frac - frac_diff
        cases.append({"x": x, "w": w, "eps_q": eps_q, "frac_diff": frac_diff, "e": e,
                      "expected": arith.rmsnorm(x, w, w_frac, out_frac, eps_q)})
    return cases


def stats_beats(x) -> list[dict]:
    return [{"x": int(v), "last": int(i == len(x) - 1)} for i, v in enumerate(x)]


def apply_beats(x, w) -> list[dict]:
    return [{"x": int(a), "w": int(b)} for a, b in zip(x, w)]


def norm_beats(x, w) -> list[dict]:
    return [{"x": int(a), "w": int(b), "last": int(i == len(x) - 1)}
            for i, (a, b) in enumerate(zip(x, w))]


# --------------------------------------------------------------------------- cocotb helpers

async def _start(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0


async def _send_each(dut, prefix, shape, rng, items, idle):
    """A fresh source on the same port (the driver has no state between sends)."""
    src = StreamSource(dut, prefix, shape, dut.clk, idle=idle, rng=rng)
    await src.send(items)


async def _wait_low(dut, signal):
    """Wait for a cycle in which ``signal`` is low (sampled at the edge)."""
    await RisingEdge(dut.clk)
    while int(signal.value):
        await RisingEdge(dut.clk)


# --------------------------------------------------------------------------- tests

@cocotb.test()
async def irsqrt_sweep(dut):
    """IRSqrt vs arith.irsqrt over edge, per-bit-length and random u; exact latency."""
    p = tb_params()
    seed, u_width = p["seed"], p["u_width"]
    dut._log.info(f"seed {seed}, u_width {u_width}")
    await _start(dut)
    latency = irsqrt_latency(u_width)
    rng = random.Random(seed)
    values = irsqrt_values(rng, u_width, p["count"])

    # back to back, output always ready: every result exactly `latency` cycles after its input
    dut.o_stream__ready.value = 1
    for u in values[:40]:
        dut.i_stream__payload.value = u
        dut.i_stream__valid.value = 1
        await RisingEdge(dut.clk)
        assert int(dut.i_stream__ready.value), "IRSqrt not ready in the cycle after a result"
        dut.i_stream__valid.value = 0
        waited = 1
        await RisingEdge(dut.clk)
        while not int(dut.o_stream__valid.value):
            await RisingEdge(dut.clk)
            waited += 1
        assert waited == latency, f"u={u}: latency {waited} != {latency}"
        got = unpack(StatsResult(), int(dut.o_stream__payload.value))
        assert (got["mant"], got["e"]) == arith.irsqrt(u), u

    # random gaps and back-pressure
    shape = StatsResult()
    sink = StreamSink(dut, "o_stream", shape, dut.clk, stall=0.5, rng=rng)
    sink.start()
    await _send_each(dut, "i_stream", unsigned(u_width), rng, values, idle=0.3)
    got = await sink.wait_for(len(values))
    for u, r in zip(values, got):
        assert (r["mant"], r["e"]) == arith.irsqrt(u), (u, r, arith.irsqrt(u))
    for _ in range(100):
        await RisingEdge(dut.clk)
    assert len(sink.items) == len(values), "extra outputs"


@cocotb.test()
async def norm_stats(dut):
    """NormStats vs arith.norm_stats; exact latency and 1 element/cycle; gaps/back-pressure."""
    p = tb_params()
    seed, max_n = p["seed"], p["max_n"]
    dut._log.info(f"seed {seed}, max_n {max_n}")
    await _start(dut)
    latency = stats_latency(max_n)
    cases = stats_cases(seed, max_n, p["count"])
    rng = random.Random(seed)
    src_shape = StatsBeat()

    # back to back with the output always ready: the elements of a vector transfer in
    # consecutive cycles, the result `latency` cycles after the last, and the next vector's
    # first element in the cycle after the result
    dut.o_stream__ready.value = 1
    for x, eps_q in cases[:12]:
        dut.eps_q.value = eps_q
        for beat in stats_beats(x):
            dut.i_stream__payload.value = pack(src_shape, beat)
            dut.i_stream__valid.value = 1
            await RisingEdge(dut.clk)
            assert int(dut.i_stream__ready.value), "NormStats refused an element mid-vector"
        dut.i_stream__valid.value = 0
        waited = 1
        await RisingEdge(dut.clk)
        while not int(dut.o_stream__valid.value):
            assert not int(dut.i_stream__ready.value), "ready while a vector is in flight"
            await RisingEdge(dut.clk)
            waited += 1
        assert waited == latency, f"latency {waited} != {latency}"
        got = unpack(StatsResult(), int(dut.o_stream__payload.value))
        assert (got["mant"], got["e"]) == arith.norm_stats(x, eps_q), (len(x), eps_q)
        await RisingEdge(dut.clk)
        assert int(dut.i_stream__ready.value), "not ready in the cycle after the result"

    # random gaps and back-pressure; eps_q is set before each vector (sampled with its last)
    sink = StreamSink(dut, "o_stream", StatsResult(), dut.clk, stall=0.5, rng=rng)
    sink.start()
    for k, (x, eps_q) in enumerate(cases):
        dut.eps_q.value = eps_q
        await _send_each(dut, "i_stream", src_shape, rng, stats_beats(x), idle=0.3)
        got = (await sink.wait_for(k + 1))[k]
        assert (got["mant"], got["e"]) == arith.norm_stats(x, eps_q), (len(x), eps_q, got)
    for _ in range(latency + 10):
        await RisingEdge(dut.clk)
    assert len(sink.items) == len(cases), "extra outputs"


@cocotb.test()
async def norm_apply(dut):
    """NormApply vs arith.rmsnorm (every shift 0..63, saturation) and the rmsnorm formula
    for any mantissa; exact latency and 1 element/cycle; gaps/back-pressure."""
    p = tb_params()
    seed = p["seed"]
    dut._log.info(f"seed {seed}")
    await _start(dut)
    cases = apply_cases(seed) + mant_cases(seed)
    rng = random.Random(seed)
    in_shape, out_shape = ApplyBeat(), signed(16)

    # back to back, output always ready: a vector goes in on consecutive cycles and comes out
    # `latency` cycles later, also on consecutive cycles
    dut.o_stream__ready.value = 1
    for case in cases[:8]:
        dut.mant.value, dut.shift.value = case["mant"], case["shift"]
        outs = []
        sent = []
        beats = apply_beats(case["x"], case["w"]) + [None] * (NormApply.latency + 1)
        for cycle, beat in enumerate(beats):
            if beat is None:
                dut.i_stream__valid.value = 0
            else:
                dut.i_stream__payload.value = pack(in_shape, beat)
                dut.i_stream__valid.value = 1
            await RisingEdge(dut.clk)
            if beat is not None:
                assert int(dut.i_stream__ready.value)
                sent.append(cycle)
            if int(dut.o_stream__valid.value):
                outs.append((cycle, unpack(out_shape, int(dut.o_stream__payload.value))))
        assert [c for c, _ in outs] == [c + NormApply.latency for c in sent]
        assert [y for _, y in outs] == [int(v) for v in case["expected"]]

    # random gaps and back-pressure; the parameters change only when the pipeline is empty
    sink = StreamSink(dut, "o_stream", out_shape, dut.clk, stall=0.4, rng=rng)
    sink.start()
    expected = []
    for case in cases:
        dut.mant.value, dut.shift.value = case["mant"], case["shift"]
        await _send_each(dut, "i_stream", in_shape, rng, apply_beats(case["x"], case["w"]),
                         idle=0.3)
        await _wait_low(dut, dut.busy)
        expected += [int(v) for v in case["expected"]]
    got = await sink.wait_for(len(expected))
    assert got == expected
    for _ in range(20):
        await RisingEdge(dut.clk)
    assert len(sink.items) == len(expected), "extra outputs"


@cocotb.test()
async def rmsnorm(dut):
    """RMSNorm (both passes) vs arith.rmsnorm with gaps and back-pressure; the next vector's
    statistics pass overlaps the previous apply pass."""
    p = tb_params()
    seed, max_n = p["seed"], p["max_n"]
    dut._log.info(f"seed {seed}, max_n {max_n}")
    await _start(dut)
    cases = rmsnorm_cases(seed, max_n, p["count"])
    rng = random.Random(seed)
    sink = StreamSink(dut, "o_stream", signed(16), dut.clk, stall=0.3, rng=rng)
    sink.start()

    async def stats_pass():
        for case in cases:
            dut.eps_q.value, dut.frac_diff.value = case["eps_q"], case["frac_diff"]
            await _send_each(dut, "stats_stream", StatsBeat(), rng, stats_beats(case["x"]),
                             idle=0.2)

    async def apply_pass():
        for case in cases:
            await _send_each(dut, "apply_stream", NormBeat(), rng,
                             norm_beats(case["x"], case["w"]), idle=0.2)

    stats_task = cocotb.start_soon(stats_pass())
    apply_task = cocotb.start_soon(apply_pass())
    expected = [int(v) for case in cases for v in case["expected"]]
    got = await sink.wait_for(len(expected), timeout_cycles=200_000)
    await stats_task
    await apply_task
    assert got == expected
    for _ in range(20):
        await RisingEdge(dut.clk)
    assert len(sink.items) == len(expected), "extra outputs"
