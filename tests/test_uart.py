# amaranth: UnusedElaboratable=no
# (the tests of rejected parameters build components that are never elaborated)
"""UART 8N1 receiver and transmitter (hdl/uart.py), Amaranth simulator at the pins: random
bytes with a per-character rate error and random sub-cycle phase, framing errors, breaks,
glitches, overruns, the transmitter's exact waveform and a loopback."""

import random

import pytest
from amaranth import Module
from amaranth.sim import Simulator

from mmfree.hdl.uart import UARTRx, UARTTx, uart_divisor
from mmfree.sim.tb_link import uart_bits

CLK_S = 1e-6        # simulator clock period


def edge_bytes(rng, n):
    return [0x00, 0xFF, 0x55, 0xAA, 0x80, 0x01] + [rng.randrange(256) for _ in range(n)]


def rx_run(divisor, chars, *, rate_error, seed, ready=True, take_after=None, tail_cycles=60):
    """Drive ``UARTRx`` (clk = divisor × 1 MHz, baud 1 Mbaud) with ``chars``: each entry is a
    byte or a list of line levels (one per bit time). Each character gets a rate error drawn
    uniformly in ``±rate_error`` (or exactly ``rate_error`` when it is a tuple ``(e,)``) and
    starts after a random idle time with a random sub-cycle phase. The sink is always ready
    (``ready``) or never until ``take_after`` cycles after the last character. Returns
    ``(bytes received, rx_errors, rx_overruns)``."""
    dut = UARTRx(divisor * 1_000_000, 1_000_000)
    assert dut.divisor == divisor
    sim = Simulator(dut)
    sim.add_clock(CLK_S)
    rng = random.Random(seed)
    got = []
    done = []

    async def line(ctx):
        await ctx.tick().repeat(3)
        for c in chars:
            levels = uart_bits(c) if isinstance(c, int) else c
            e = rate_error[0] if isinstance(rate_error, tuple) else rng.uniform(-rate_error, rate_error)
            bit_s = divisor * CLK_S * (1 + e)
            await ctx.delay(rng.uniform(0, 2.5) * divisor * CLK_S * rng.choice([0, 1, 1]))
            for level in levels:
                ctx.set(dut.rx, level)
                await ctx.delay(bit_s)
            ctx.set(dut.rx, 1)                  # idle between characters
        done.append(True)

    async def sink(ctx):
        idle = 0
        while not done or idle < (take_after or 0) + tail_cycles:
            if done:
                idle += 1
            r = ready or (take_after is not None and bool(done) and idle >= take_after)
            ctx.set(dut.o_stream.ready, r)
            _, _, v, p = await ctx.tick().sample(dut.o_stream.valid, dut.o_stream.payload)
            if r and v:
                got.append(p)
        got.append((ctx.get(dut.rx_errors), ctx.get(dut.rx_overruns)))

    sim.add_testbench(line)
    sim.add_testbench(sink)
    sim.run()
    errors, overruns = got.pop()
    return got, errors, overruns


@pytest.mark.parametrize("divisor,rate_error,seed", [
    (8, 0.01, 1),           # the link's rate, ±1 % per character
    (13, 0.01, 2),
    (4, 0.01, 3),           # the smallest divisor
    (8, (0.02,), 4),        # the largest rate error the divisor check lets through, both ways
    (8, (-0.02,), 5),
    (16, (0.03,), 6),       # margin beyond it at a larger divisor
])
def test_rx_receives_every_byte(divisor, rate_error, seed):
    print("seed", seed)
    data = edge_bytes(random.Random(seed), 40)
    got, errors, overruns = rx_run(divisor, data, rate_error=rate_error, seed=seed)
    assert got == data
    assert (errors, overruns) == (0, 0)


def test_rx_framing_error_and_break():
    """A stop bit of 0 drops the byte and counts once; so does a break (line low for 3
    character times); reception resumes with the next start bit."""
    d = 8
    bad_stop = uart_bits(0x3C)[:-1] + [0]
    brk = [0] * 30
    chars = [0x11, bad_stop, 0x22, brk, 0x33, 0x44]
    got, errors, overruns = rx_run(d, chars, rate_error=0.01, seed=7)
    assert got == [0x11, 0x22, 0x33, 0x44]
    assert (errors, overruns) == (2, 0)


def test_rx_ignores_glitches():
    """A low pulse shorter than half a bit is no start bit."""
    d = 16
    dut = UARTRx(d * 1_000_000, 1_000_000)
    sim = Simulator(dut)
    sim.add_clock(CLK_S)
    got = []

    async def line(ctx):
        await ctx.tick().repeat(3)
        for width in (1, 3, d // 2 - 3):        # cycles low: all shorter than half a bit
            ctx.set(dut.rx, 0)
            await ctx.tick().repeat(width)
            ctx.set(dut.rx, 1)
            await ctx.tick().repeat(2 * d)
        for level in uart_bits(0x5A):
            ctx.set(dut.rx, level)
            await ctx.tick().repeat(d)
        await ctx.tick().repeat(3 * d)
        got.append((ctx.get(dut.rx_errors), ctx.get(dut.rx_overruns)))

    async def sink(ctx):
        ctx.set(dut.o_stream.ready, 1)
        async for _, _, v, p in ctx.tick().sample(dut.o_stream.valid, dut.o_stream.payload):
            if v:
                got.append(p)

    sim.add_testbench(line)
    sim.add_testbench(sink, background=True)
    sim.run()
    assert got == [0x5A, (0, 0)]


def test_rx_overrun_drops_new_bytes():
    """While the held byte is not taken, later bytes are dropped and counted; the held one is
    delivered once the sink is ready."""
    got, errors, overruns = rx_run(8, [0xA1, 0xB2, 0xC3], rate_error=0.0, seed=8, ready=False,
                                   take_after=20)
    assert got == [0xA1]
    assert (errors, overruns) == (0, 2)


@pytest.mark.parametrize("divisor,idle,seed", [(8, 0.0, 11), (5, 0.5, 12)])
def test_tx_waveform(divisor, idle, seed):
    """Every line cycle equals the expected waveform: the start bit begins the cycle after a
    transfer, each bit lasts ``divisor`` cycles, back-to-back bytes leave no gap."""
    print("seed", seed)
    rng = random.Random(seed)
    data = edge_bytes(rng, 12)
    dut = UARTTx(divisor * 1_000_000, 1_000_000)
    sim = Simulator(dut)
    sim.add_clock(CLK_S)
    line, transfers = [], []

    async def source(ctx):
        cycle = 0
        for b in data:
            while idle and rng.random() < idle:
                _, _, tx = await ctx.tick().sample(dut.tx)
                line.append(tx)
                cycle += 1
            ctx.set(dut.i_stream.payload, b)
            ctx.set(dut.i_stream.valid, 1)
            while True:
                _, _, tx, ready = await ctx.tick().sample(dut.tx, dut.i_stream.ready)
                line.append(tx)
                cycle += 1
                if ready:
                    transfers.append(cycle)
                    break
            ctx.set(dut.i_stream.valid, 0)
        for _ in range(11 * divisor):
            _, _, tx = await ctx.tick().sample(dut.tx)
            line.append(tx)

    sim.add_testbench(source)
    sim.run()
    # line[k] is the level during cycle k+1's sample, i.e. the cycle ending at tick k+1
    want = [1] * len(line)
    for b, t in zip(data, transfers):
        for i, level in enumerate(uart_bits(b)):
            for c in range(divisor):
                want[t + i * divisor + c] = level
    assert line == want
    if not idle:
        assert [b - a for a, b in zip(transfers, transfers[1:])] == [10 * divisor] * (len(data) - 1)


def test_loopback_at_the_smallest_divisor():
    rng = random.Random(21)
    data = edge_bytes(rng, 30)
    tx, rx = UARTTx(4_000_000, 1_000_000), UARTRx(4_000_000, 1_000_000)
    m = Module()
    m.submodules.tx, m.submodules.rx = tx, rx
    m.d.comb += rx.rx.eq(tx.tx)
    sim = Simulator(m)
    sim.add_clock(CLK_S)
    got = []

    async def source(ctx):
        for b in data:
            ctx.set(tx.i_stream.payload, b)
            ctx.set(tx.i_stream.valid, 1)
            await ctx.tick().until(tx.i_stream.ready)
        ctx.set(tx.i_stream.valid, 0)
        await ctx.tick().repeat(60)

    async def sink(ctx):
        ctx.set(rx.o_stream.ready, 1)
        async for _, _, v, p in ctx.tick().sample(rx.o_stream.valid, rx.o_stream.payload):
            if v:
                got.append(p)

    sim.add_testbench(source)
    sim.add_testbench(sink, background=True)
    sim.run()
    assert got == data


def test_divisor_checks():
    assert uart_divisor(24_000_000, 3_000_000) == 8
    assert uart_divisor(12_000_000, 3_000_000) == 4
    assert uart_divisor(48_000_000, 115_200) == 417
    with pytest.raises(ValueError, match=r"3.33 cycles per bit, fewer than 4: raise the clock"):
        uart_divisor(10_000_000, 3_000_000)
    with pytest.raises(ValueError, match=r"a divisor of 8 cycles per bit gives 3125000 baud, "
                                         r"4.2% off \(at most 2% works\)"):
        uart_divisor(25_000_000, 3_000_000)
    with pytest.raises(ValueError, match="must be positive integers"):
        uart_divisor(24e6, 3_000_000)
    with pytest.raises(ValueError, match="must be positive integers"):
        uart_divisor(24_000_000, 0)
    with pytest.raises(ValueError, match="fewer than 4"):
        UARTRx(10_000_000, 3_000_000)
    with pytest.raises(ValueError, match="4.2% off"):
        UARTTx(25_000_000, 3_000_000)
