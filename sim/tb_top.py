"""cocotb testbench of the whole accelerator (hdl/top.py ``AcceleratorTop`` with the real
``AcceleratorCore``) at its UART pins, run from tests/test_top.py through ``run_cocotb``.

The host side is bit-accurate: every request byte is an 8N1 character driven on ``uart_rx``
(random sub-cycle start phase, random idle, a rate error of up to ±1 % per character), every
reply byte is decoded from ``uart_tx`` (each bit checked at both ends of its window, so every
bit lasts exactly ``divisor`` cycles; the stop bit is checked).

The oracle of every reply byte is :class:`mmfree.sim.refboard.ReferenceBoard` with
:class:`CoreExecutor` (the firmware interpreter for this build's HardwareConfig; its cycle
counters are the firmware cost model's, which is the core's exact cycle count), so TOKEN
replies, counters included, are compared byte for byte.
Next tokens and logits are also checked against the integer golden model's values, which the
pytest side computed (``events``).

Only the top's pins and the protocol are used, so the test holds whatever the core looks like
inside.

Parameters (``tb_params()``):
    ``hw``      HardwareConfig fields (dict)
    ``image``   the device image, hex
    ``vocab``   V
    ``events``  list of ``{"token": t, "next": n, "logits": [...] or None}`` (golden; logits:
                ask LOGITS after this token) or ``"reset"`` (RESET_STATE)
    ``seed``    for the session's random choices
"""

from __future__ import annotations

import random
import struct

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import Event, FallingEdge, First, RisingEdge, Timer
from cocotb.utils import get_sim_time

from mmfree import protocol as P
from mmfree.firmware.interpreter import program_cost
from mmfree.firmware.isa import HardwareConfig
from mmfree.hdl.uart import uart_divisor
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.refboard import InterpreterExecutor, ReferenceBoard
from mmfree.sim.tb_link import corrupt, garbage, load_done, load_frames, uart_bits

__all__ = ["CLK_PS", "RESET", "CoreExecutor", "PinHost"]

RESET = "reset"
CLK_PS = 10_000                         # simulated clock period (the rate is irrelevant here)
BUSY_LOW_MAX = 300                      # "a few hundred cycles" of busy low while a TOKEN runs


class CoreExecutor(InterpreterExecutor):
    """The accelerator core as the link sees it, for a known HardwareConfig ``hw`` (the INFO
    does not carry every field, so ``InterpreterExecutor``'s lookup cannot rebuild a small
    test configuration)."""

    def __init__(self, hw: HardwareConfig):
        self.hw = hw

    def header_ok(self, length):
        import numpy as np

        from mmfree.firmware.interpreter import Interpreter
        try:
            self.interp = Interpreter(bytes(self.memory[:length]), self.hw)
        except ValueError:
            self.interp = None
            return False
        self._logits = np.zeros(self.vocab_size, dtype=np.int64)
        return True


class PinHost:
    """The host at the UART pins of ``dut``: :meth:`send` drives ``uart_rx``; a background
    monitor decodes ``uart_tx`` into ``received`` and records ``busy``'s edges."""

    def __init__(self, dut, divisor: int, rng: random.Random, jitter: float = 0.01):
        self.dut, self.divisor, self.rng, self.jitter = dut, divisor, rng, jitter
        self.bit_ps = divisor * CLK_PS
        self.received = bytearray()
        self.byte_times: list[int] = []            # ps of each received byte's start bit
        self.busy_edges: list[tuple[int, int]] = []
        self._got = Event()
        dut.uart_rx.value = 1

    def start(self):
        cocotb.start_soon(self._tx_monitor())
        cocotb.start_soon(self._busy_monitor())

    async def send(self, data: bytes) -> None:
        for byte in data:
            await Timer(self.rng.randrange(0, 3 * CLK_PS), unit="ps")     # idle, any phase
            bit_ps = round(self.bit_ps * (1 + self.rng.uniform(-self.jitter, self.jitter)))
            for level in uart_bits(byte):
                self.dut.uart_rx.value = level
                await Timer(bit_ps, unit="ps")
        self.dut.uart_rx.value = 1

    async def _tx_monitor(self) -> None:
        tx = self.dut.uart_tx
        early, late = CLK_PS // 10, self.bit_ps - CLK_PS // 10
        while True:
            await FallingEdge(tx)
            t0 = get_sim_time(unit="ps")
            levels = []
            for k in range(10):                    # start, 8 data bits LSB first, stop
                await Timer(k * self.bit_ps + early - (get_sim_time(unit="ps") - t0), unit="ps")
                a = int(tx.value)
                await Timer(late - early, unit="ps")
                b = int(tx.value)
                assert a == b, f"uart_tx changed inside bit {k} of the character at {t0} ps"
                levels.append(a)
            assert levels[0] == 0, "start bit"
            assert levels[9] == 1, f"stop bit of the character at {t0} ps is 0"
            self.received.append(sum(v << i for i, v in enumerate(levels[1:9])))
            self.byte_times.append(t0)
            self._got.set()

    async def _busy_monitor(self) -> None:
        busy = self.dut.busy
        self.busy_edges.append((get_sim_time(unit="ps"), int(busy.value)))
        while True:
            await busy.value_change
            self.busy_edges.append((get_sim_time(unit="ps"), int(busy.value)))

    def busy_low_ps(self, t0: int, t1: int) -> int:
        """ps during which ``busy`` was low in [t0, t1]."""
        low, level, t = 0, 0, t0
        for when, value in self.busy_edges:
            if when <= t0:
                level = value
                continue
            if when >= t1:
                break
            if not level:
                low += when - t
            level, t = value, when
        if not level:
            low += t1 - t
        return low

    async def wait_bytes(self, count: int, timeout_cycles: int) -> None:
        deadline = get_sim_time(unit="ps") + timeout_cycles * CLK_PS
        while len(self.received) < count:
            left = deadline - get_sim_time(unit="ps")
            if left <= 0:
                raise TimeoutError(f"the board sent {len(self.received)} of {count} expected bytes "
                                   f"within {timeout_cycles} cycles")
            self._got.clear()
            await First(self._got.wait(), Timer(left, unit="ps"))


def _token_fields(frame: P.Frame):
    return struct.unpack(P.TOKEN_REPLY_FORMAT, frame.payload)


@cocotb.test()
async def test_top_session(dut):
    p = tb_params()
    seed = p["seed"]
    rng = random.Random(seed)
    cocotb.log.info(f"seed {seed}")
    hw = HardwareConfig(**p["hw"])
    info = hw.info()
    image = bytes.fromhex(p["image"])
    V = p["vocab"]
    divisor = uart_divisor(hw.clock_hz, hw.baud)

    cocotb.start_soon(Clock(dut.clk, CLK_PS, unit="ps").start())
    host = PinHost(dut, divisor, rng)
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    await RisingEdge(dut.clk)
    host.start()

    executor = CoreExecutor(hw)
    model = ReferenceBoard(info, executor=executor)
    decoder = P.FrameDecoder()
    expected_len = 0
    stats = {"token_cycles": [], "requests": 0}

    async def transact(raw: bytes, n_replies: int = 1, extra_cycles: int = 0) -> list[P.Frame]:
        """Send ``raw``; wait for the oracle's reply bytes; compare; decode."""
        nonlocal expected_len
        want = model.feed(raw)
        start = expected_len
        expected_len += len(want)
        stats["requests"] += 1
        await host.send(raw)
        t_sent = get_sim_time(unit="ps")
        await host.wait_bytes(expected_len, timeout_cycles=
                              12 * divisor * (len(want) + 40) + 2 * extra_cycles + 5000)
        got = bytes(host.received[start:expected_len])
        frames = decoder.feed(got)
        assert got == want, f"reply to {raw[:24].hex()}..:\n got {got.hex()}\nwant {want.hex()}"
        assert len(frames) == n_replies and all(f.status == "ok" for f in frames), frames
        # the reply is out: the design has nothing left to do
        await Timer(divisor * CLK_PS, unit="ps")
        assert int(dut.busy.value) == 0, f"busy still high after the reply to {raw[:24].hex()}"
        return frames, t_sent, host.byte_times[start]

    def is_error(frame, code, opcode):
        return frame.opcode == P.OP_ERROR and frame.payload == bytes([code, opcode])

    E = P.Error
    # garbage, then INFO right behind it: BAD_CRC for the garbage, then INFO = the build's
    (err, f), _, _ = await transact(garbage(rng, 7) + P.encode_frame(P.OP_INFO), n_replies=2)
    assert err.opcode == P.OP_ERROR and err.payload[0] == E.BAD_CRC
    assert f.opcode == P.OP_INFO | P.REPLY and P.Info.unpack(f.payload) == info
    # no model yet
    (f,), _, _ = await transact(P.encode_frame(P.OP_TOKEN, struct.pack("<H", 0)))
    assert is_error(f, E.NO_MODEL, P.OP_TOKEN)

    # the image in random chunks; one chunk first arrives corrupted (refused), then is resent
    sizes = [rng.choice([P.LOAD_CHUNK, P.LOAD_CHUNK, rng.randint(1, P.LOAD_CHUNK - 1)])
             for _ in range(5)]
    frames = load_frames(image, sizes)
    bad_k = rng.randrange(len(frames))
    cocotb.log.info(f"image {len(image)} bytes in {len(frames)} LOAD frames, chunk {bad_k} corrupted once")
    address = 0
    for k, frame in enumerate(frames):
        if k == bad_k:
            (f,), _, _ = await transact(corrupt(frame, rng))
            assert f.opcode == P.OP_ERROR and f.payload[0] == E.BAD_CRC
        (f,), _, _ = await transact(frame)
        a, length, crc = struct.unpack(P.LOAD_REPLY_FORMAT, f.payload)
        assert a == address and crc == P.crc16(image[a:a + length])
        address += length
    assert address == len(image)
    (f,), _, _ = await transact(load_done(image[:-1]))               # wrong length and CRC
    assert is_error(f, E.IMAGE_CRC, P.OP_LOAD_DONE)
    (f,), _, _ = await transact(load_done(image))
    assert f.opcode == P.OP_LOAD_DONE | P.REPLY and f.payload == b""
    assert model.model_ok

    # tokens (the golden model's chain), LOGITS after some, RESET_STATE in between
    expected_cycles = sum(c.cycles for c in program_cost(executor.interp.program, hw))
    logits_checked = 0
    for k, ev in enumerate(p["events"]):
        if ev == RESET:
            (f,), _, _ = await transact(P.encode_frame(P.OP_RESET_STATE),
                                        extra_cycles=4 * hw.max_layers * hw.max_d)
            assert f.opcode == P.OP_RESET_STATE | P.REPLY and f.payload == b""
            continue
        (f,), t_sent, t_reply = await transact(
            P.encode_frame(P.OP_TOKEN, struct.pack("<H", ev["token"])),
            extra_cycles=4 * expected_cycles)
        nxt, cycles, busy = _token_fields(f)
        assert nxt == ev["next"], f"event {k}: token {ev['token']} → {nxt}, golden {ev['next']}"
        assert 0 < busy <= cycles
        stats["token_cycles"].append(cycles)
        # the token runs between the request's end and the reply's start: busy stays high
        low = host.busy_low_ps(t_sent, t_reply) // CLK_PS
        assert low <= BUSY_LOW_MAX, f"busy was low {low} cycles while token {ev['token']} ran"
        assert (t_reply - t_sent) // CLK_PS >= cycles, "the reply came before the token could end"
        if ev["logits"] is not None:
            (f,), _, _ = await transact(P.encode_frame(P.OP_LOGITS))
            assert f.opcode == P.OP_LOGITS | P.REPLY
            got = list(struct.unpack(f"<{V}h", f.payload))
            bad = [j for j in range(V) if got[j] != ev["logits"][j]]
            assert not bad, (f"event {k}: logits differ from the golden model at {bad[:8]}: got "
                             f"{[got[j] for j in bad[:8]]}, want {[ev['logits'][j] for j in bad[:8]]}")
            logits_checked += 1
    assert logits_checked >= 1

    # a token outside the vocabulary; a truncated LOAD right before INFO (resynchronization)
    (f,), _, _ = await transact(P.encode_frame(P.OP_TOKEN, struct.pack("<H", V)))
    assert is_error(f, E.BAD_TOKEN, P.OP_TOKEN)
    (err, f), _, _ = await transact(frames[0][:12] + P.encode_frame(P.OP_INFO), n_replies=2)
    assert is_error(err, E.BAD_CRC, P.OP_LOAD) and P.Info.unpack(f.payload) == info

    for _ in range(40):                                 # nothing more comes out
        await Timer(divisor * CLK_PS, unit="ps")
    assert len(host.received) == expected_len, "the board sent more bytes than expected"
    assert int(dut.rx_errors.value) == 0 and int(dut.rx_overruns.value) == 0
    assert int(dut.busy.value) == 0
    cocotb.log.info(f"{stats['requests']} requests, {expected_len} reply bytes, "
                    f"cycles/token {sorted(set(stats['token_cycles']))} "
                    f"(cost model: {expected_cycles}), {logits_checked} LOGITS checked, "
                    f"{get_sim_time(unit='ps') // CLK_PS} cycles simulated")
