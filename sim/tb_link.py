"""Testbench pieces for the host link (hdl/link.py, hdl/uart.py): request generators, the
stream-level wrapper :class:`StubLink`, and the cocotb test that talks to
:class:`mmfree.hdl.link.StubBoard` through its UART pins (run from tests/test_link.py).

The oracle is the one Python model of a board, :class:`mmfree.sim.refboard.ReferenceBoard`, with
the :class:`~mmfree.sim.refboard.StubExecutor` (the twin of StubCore): :func:`stub_board`. Every
reply byte on the wire is compared with it; the tests also check the replies field by field
against the protocol (INFO contents, LOAD's crc16, TOKEN layout, ...).
"""

import random
import struct
import zlib

import cocotb
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge, Timer

from mmfree import protocol as P
from mmfree.hdl.link import (BODY_MAX, LinkLayer, StubCore, connect_core, stub_image, stub_logit,
                             stub_token_result)
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.refboard import ReferenceBoard, StubExecutor

__all__ = ["TEST_INFO", "StubLink", "stub_board", "load_frames", "load_done", "garbage", "corrupt",
           "random_session", "random_byte_session", "uart_bits", "UartHost"]

# A small board: 24 MHz / 3 Mbaud = 8 cycles per bit, 1 KiB of image memory, V <= 40.
TEST_INFO = P.Info(magic=b"MMFA", protocol=P.PROTOCOL_VERSION, lanes=32, config_hash=0xC0DBC0DB,
                   clock_hz=24_000_000, baud=3_000_000, memory_bytes=1024, max_d=128,
                   max_inter=256, max_vocab=40, max_layers=4, arith_version=1)


class StubLink(wiring.Component):
    """LinkLayer + StubCore with the link's byte streams as ports (no UART), for fast tests.
    Attributes ``link`` and ``core``."""

    i_rx: In(stream.Signature(8))
    o_tx: Out(stream.Signature(8))

    def __init__(self, info: P.Info, *, load_stall: bool = False):
        self.link = LinkLayer(info)
        self.core = StubCore(info.memory_bytes, info.max_vocab, load_stall=load_stall)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.link = self.link
        m.submodules.core = self.core
        wiring.connect(m, wiring.flipped(self.i_rx), self.link.i_rx)
        wiring.connect(m, self.link.o_tx, wiring.flipped(self.o_tx))
        connect_core(m, self.link, self.core)
        return m


def stub_board(info: P.Info = TEST_INFO, **hooks) -> ReferenceBoard:
    """The oracle of LinkLayer + StubCore: a ReferenceBoard with the StubExecutor."""
    return ReferenceBoard(info, executor=StubExecutor(), **hooks)


def load_frames(image: bytes, chunks: list[int], base: int = 0) -> list[bytes]:
    """LOAD frames that carry ``image`` from ``base`` in chunks of the given sizes (cycled)."""
    out, pos, k = [], 0, 0
    while pos < len(image):
        size = chunks[k % len(chunks)]
        k += 1
        out.append(P.encode_frame(P.OP_LOAD, struct.pack(P.LOAD_HEADER_FORMAT, base + pos)
                                  + image[pos:pos + size]))
        pos += size
    return out


def load_done(image: bytes) -> bytes:
    return P.encode_frame(P.OP_LOAD_DONE, struct.pack(P.LOAD_DONE_FORMAT, len(image), zlib.crc32(image)))


def garbage(rng: random.Random, n: int) -> bytes:
    """``n`` line bytes without END (so they join the next frame's leading END as one body),
    with ESC and the escape codes over-represented."""
    pool = [P.ESC, P.ESC_END, P.ESC_ESC] + [b for b in range(256) if b != P.END]
    return bytes(rng.choice(pool) for _ in range(n))


def corrupt(frame: bytes, rng: random.Random) -> bytes:
    """Flip bits of one body byte of an encoded frame (never creating or destroying END/ESC)."""
    body = bytearray(frame)
    while True:
        k = rng.randrange(1, len(body) - 1)
        new = body[k] ^ (1 << rng.randrange(8))
        if body[k] not in (P.END, P.ESC) and new not in (P.END, P.ESC) and body[k - 1] != P.ESC:
            body[k] = new
            return bytes(body)


class _Session:
    """Collects the pieces of a random session."""

    def __init__(self):
        self.pieces: list[bytes] = []

    def add(self, *pieces: bytes) -> None:
        self.pieces.extend(pieces)


def random_session(rng: random.Random, info: P.Info, n: int) -> list[bytes]:
    """``n`` random requests (raw line bytes each): good loads of a stub image in random
    chunks, LOAD_DONE right and wrong, tokens in and out of range, LOGITS, INFO, RESET_STATE,
    and every kind of bad frame (corrupted, truncated, garbage, too long, empty, unknown
    opcodes, wrong lengths, out-of-bounds loads)."""
    vocab = rng.randint(2, info.max_vocab)
    image = stub_image(vocab, rng.randint(8, 3 * P.LOAD_CHUNK // 2), seed=rng.randrange(1 << 30))
    loads = load_frames(image, [rng.choice([1, 7, 64, P.LOAD_CHUNK]) for _ in range(4)])
    session, pos = _Session(), 0
    add = session.add
    while len(session.pieces) < n:
        kind = rng.choice(["image", "load", "done", "token", "token", "logits", "info", "reset",
                           "corrupt", "truncated", "garbage", "long", "empty", "opcode",
                           "length", "address", "badtoken"])
        if kind == "image":                 # the whole image, then LOAD_DONE
            add(*loads, load_done(image))
            pos = len(loads)
        elif kind == "load":                # the next chunk (from the start after the last)
            if pos >= len(loads):
                pos = 0
            add(loads[pos])
            pos += 1
        elif kind == "done":
            add(load_done(image) if rng.random() < 0.7 else load_done(image[:-1]))
        elif kind == "token":
            add(P.encode_frame(P.OP_TOKEN, struct.pack("<H", rng.randrange(vocab))))
        elif kind == "badtoken":
            add(P.encode_frame(P.OP_TOKEN, struct.pack("<H", rng.choice([vocab, 0xFFFF]))))
        elif kind == "logits":
            add(P.encode_frame(P.OP_LOGITS))
        elif kind == "info":
            add(P.encode_frame(P.OP_INFO))
        elif kind == "reset":
            add(P.encode_frame(P.OP_RESET_STATE))
        elif kind == "corrupt":
            add(corrupt(rng.choice(loads + [P.encode_frame(P.OP_INFO, b"\x00")]), rng))
        elif kind == "truncated":
            f = rng.choice(loads)
            add(f[:rng.randrange(1, len(f) - 1)])
        elif kind == "garbage":
            add(garbage(rng, rng.randint(1, 20)))
        elif kind == "long":
            add(P.encode_frame(P.OP_LOAD, bytes(BODY_MAX - 2 + rng.randint(0, 3))))
        elif kind == "empty":
            add(bytes([P.END]) * rng.randint(1, 3))
        elif kind == "opcode":
            add(P.encode_frame(rng.choice([0x00, 0x07, 0x7F, 0x81, 0xC0, 0xFF]),
                               bytes(rng.randint(0, 4))))
        elif kind == "length":
            op, size = rng.choice([(P.OP_INFO, 1), (P.OP_TOKEN, 3), (P.OP_TOKEN, 1),
                                   (P.OP_LOAD_DONE, 7), (P.OP_LOAD, 4), (P.OP_LOGITS, 2),
                                   (P.OP_RESET_STATE, 1)])
            add(P.encode_frame(op, bytes(size)))
        elif kind == "address":
            address = rng.choice([info.memory_bytes, info.memory_bytes - 1, 0xFFFFFFFF])
            add(P.encode_frame(P.OP_LOAD, struct.pack("<I", address) + b"\x01\x02"))
    return session.pieces[:n]


def random_byte_session(rng: random.Random, info: P.Info, n: int) -> list[bytes]:
    """``n`` random pieces of line bytes, damaged at the byte level: the requests of a host that
    loads a stub image (chunks in order, repeated, skipped, from other bases; LOAD_DONE right
    and wrong), runs tokens, asks for LOGITS, INFO, RESET_STATE, interleaved with frames with
    random bytes replaced (which may create or destroy END and ESC, splitting or merging
    frames), frames cut short anywhere, garbage with and without END, bodies over the buffer,
    bodies of random opcodes and lengths with a good CRC, and empty frames. Images come in two
    vocabularies, so a stale image check or header is visible."""
    images = []
    for k in range(2):                      # the second may not fit: MODEL_MISMATCH
        vocab = rng.choice([rng.randint(2, info.max_vocab)] * 3 + [info.max_vocab + k])
        image = stub_image(vocab, rng.randint(3, 160), header_ok=k == 0 or rng.random() < 0.7,
                           seed=rng.randrange(1 << 30))
        images.append((vocab, image, load_frames(image, [rng.choice([1, 9, 64, P.LOAD_CHUNK])
                                                         for _ in range(3)])))
    vocab, image, loads = images[0]
    pos = 0
    session = _Session()
    add = session.add

    def good_frame():
        op = rng.choice([P.OP_INFO, P.OP_LOAD, P.OP_LOAD_DONE, P.OP_RESET_STATE, P.OP_TOKEN,
                         P.OP_TOKEN, P.OP_LOGITS])
        if op == P.OP_LOAD:
            return rng.choice(loads)
        if op == P.OP_LOAD_DONE:
            return load_done(image)
        if op == P.OP_TOKEN:
            return P.encode_frame(op, struct.pack("<H", rng.randrange(vocab + 2)))
        return P.encode_frame(op)

    while len(session.pieces) < n:
        kind = rng.choices(
            ["image", "next", "repeat", "skip", "done", "done_wrong", "switch", "token", "logits",
             "info", "reset", "replace", "cut", "garbage", "garbage_end", "long", "empty",
             "random_body", "address"],
            weights=[5, 2, 1, 1, 2, 1, 1, 8, 2, 1, 2, 5, 4, 3, 1, 1, 1, 2, 1])[0]
        if kind == "image":
            add(*loads, load_done(image))
            pos = len(loads)
        elif kind == "next":
            if pos >= len(loads):
                pos = 0
            add(loads[pos])
            pos += 1
        elif kind == "repeat":              # a chunk again (an accepted chunk counts twice)
            add(loads[max(0, pos - 1) % len(loads)])
        elif kind == "skip":
            pos += 1
        elif kind == "done":
            add(load_done(image))
        elif kind == "done_wrong":
            add(load_done(image[:-1] if len(image) > 1 else image + b"\x00"))
        elif kind == "switch":              # the other image (its LOADs start at address 0)
            images.reverse()
            vocab, image, loads = images[0]
            pos = 0
        elif kind == "token":               # a few tokens, some followed by LOGITS
            for _ in range(rng.randint(1, 4)):
                add(P.encode_frame(P.OP_TOKEN, struct.pack("<H", rng.choice(
                    [rng.randrange(vocab)] * 4 + [vocab, 0xFFFF]))))
                if rng.random() < 0.4:
                    add(P.encode_frame(P.OP_LOGITS))
        elif kind == "logits":
            add(P.encode_frame(P.OP_LOGITS))
        elif kind == "info":
            add(P.encode_frame(P.OP_INFO))
        elif kind == "reset":
            add(P.encode_frame(P.OP_RESET_STATE))
        elif kind == "replace":             # any byte, END and ESC included
            f = bytearray(good_frame())
            for _ in range(rng.randint(1, 3)):
                f[rng.randrange(len(f))] = rng.choice([P.END, P.ESC, P.ESC_END, rng.randrange(256)])
            add(bytes(f))
        elif kind == "cut":
            f = good_frame()
            add(f[:rng.randrange(1, len(f))])
        elif kind == "garbage":
            add(garbage(rng, rng.randint(1, 12)))
        elif kind == "garbage_end":
            g = bytearray(garbage(rng, rng.randint(2, 12)))
            g[rng.randrange(len(g))] = P.END
            add(bytes(g))
        elif kind == "long":
            add(P.encode_frame(rng.randrange(256), bytes(rng.randrange(256) for _ in range(
                BODY_MAX - 2 + rng.randint(0, 4)))))
        elif kind == "empty":
            add(bytes([P.END]) * rng.randint(1, 3))
        elif kind == "random_body":         # a good CRC over a random opcode and length
            op = rng.choice([rng.randrange(256), P.OP_LOAD, P.OP_TOKEN, P.OP_LOAD_DONE, P.OP_INFO])
            payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 3, 4, 5, 8, 9])))
            if op == P.OP_LOAD and payload[:4]:
                payload = struct.pack("<I", rng.choice([0, 1, info.memory_bytes - 1])) + payload[4:]
            add(P.encode_frame(op, payload))
        elif kind == "address":
            address = rng.choice([info.memory_bytes - 1, info.memory_bytes, 1 << 31])
            add(P.encode_frame(P.OP_LOAD, struct.pack("<I", address) + b"\x01\x02"))
    return session.pieces[:n]


def uart_bits(byte: int) -> list[int]:
    """The 10 line levels of an 8N1 character: start, data LSB first, stop."""
    return [0] + [(byte >> i) & 1 for i in range(8)] + [1]


# --------------------------------------------------------------------------- cocotb, UART pins

CLK_PS = 10_000


class UartHost:
    """The host at the UART pins: sends bytes with a random rate error (uniform in ±jitter,
    drawn per character) and random sub-cycle start times, and receives the board's bytes by
    sampling ``uart_tx`` in the middle of each bit (checking every stop bit)."""

    def __init__(self, dut, divisor: int, rng: random.Random, jitter: float):
        self.dut, self.divisor, self.rng, self.jitter = dut, divisor, rng, jitter
        self.received = bytearray()
        dut.uart_rx.value = 1

    async def send(self, data: bytes) -> None:
        for byte in data:
            await Timer(self.rng.randrange(0, 3 * CLK_PS), unit="ps")    # idle, any phase
            bit_ps = round(self.divisor * CLK_PS * (1 + self.rng.uniform(-self.jitter, self.jitter)))
            for level in uart_bits(byte):
                self.dut.uart_rx.value = level
                await Timer(bit_ps, unit="ps")

    async def monitor(self) -> None:
        d = self.divisor
        while True:
            await RisingEdge(self.dut.clk)
            if int(self.dut.uart_tx.value):
                continue
            for _ in range(d // 2):
                await RisingEdge(self.dut.clk)
            assert int(self.dut.uart_tx.value) == 0, "start bit shorter than half a bit"
            byte = 0
            for i in range(8):
                for _ in range(d):
                    await RisingEdge(self.dut.clk)
                byte |= int(self.dut.uart_tx.value) << i
            for _ in range(d):
                await RisingEdge(self.dut.clk)
            assert int(self.dut.uart_tx.value) == 1, "stop bit is 0"
            self.received.append(byte)

    async def wait_bytes(self, count: int, timeout_cycles: int) -> None:
        for _ in range(timeout_cycles):
            if len(self.received) >= count:
                return
            await RisingEdge(self.dut.clk)
        raise TimeoutError(f"the board sent {len(self.received)} of {count} expected bytes")


@cocotb.test()
async def test_link_at_uart_pins(dut):
    params = tb_params()
    seed = params["seed"]
    rng = random.Random(seed)
    cocotb.log.info(f"seed {seed}")
    info = TEST_INFO
    divisor = round(info.clock_hz / info.baud)
    cocotb.start_soon(Clock(dut.clk, CLK_PS, unit="ps").start())
    host = UartHost(dut, divisor, rng, jitter=0.01)
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    cocotb.start_soon(host.monitor())
    model = stub_board(info)
    replies = P.FrameDecoder()
    expected_len = 0

    async def transact(raw: bytes, n_replies: int = 1) -> list[P.Frame]:
        """Send ``raw``; wait for the model's reply bytes; compare them all; decode."""
        nonlocal expected_len
        want = model.feed(raw)
        start = expected_len
        expected_len += len(want)
        await host.send(raw)
        await host.wait_bytes(expected_len, timeout_cycles=20 * divisor * (len(want) + 40) + 5000)
        got = bytes(host.received[start:expected_len])
        assert got == want, f"reply to {raw.hex()}:\n got {got.hex()}\nwant {want.hex()}"
        frames = replies.feed(got)
        assert len(frames) == n_replies
        return frames

    def is_error(frame, code, opcode):
        return frame.opcode == P.OP_ERROR and frame.payload == bytes([code, opcode])

    E = P.Error
    # before any model: TOKEN → NO_MODEL; INFO contents
    f, = await transact(P.encode_frame(P.OP_TOKEN, b"\x01\x00"))
    assert is_error(f, E.NO_MODEL, P.OP_TOKEN)
    f, = await transact(P.encode_frame(P.OP_INFO))
    assert f.opcode == P.OP_INFO | P.REPLY and P.Info.unpack(f.payload) == info

    vocab = 12
    image = stub_image(vocab, 70, seed=seed)
    sizes = [30, 25, 15]
    frames = load_frames(image, sizes)
    # a corrupted chunk is refused and not written, its resend is accepted
    f, = await transact(corrupt(frames[0], rng))
    assert f.opcode == P.OP_ERROR and f.payload[0] == E.BAD_CRC
    for k, frame in enumerate(frames):
        f, = await transact(frame)
        address, length, crc = struct.unpack(P.LOAD_REPLY_FORMAT, f.payload)
        assert (address, length) == (sum(sizes[:k]), sizes[k])
        assert crc == P.crc16(image[address:address + length])
    f, = await transact(load_done(image[:-1]))
    assert is_error(f, E.IMAGE_CRC, P.OP_LOAD_DONE)
    f, = await transact(load_done(image))
    assert f.opcode == P.OP_LOAD_DONE | P.REPLY and f.payload == b""

    # TOKEN reply layout, LOGITS length and values
    f, = await transact(P.encode_frame(P.OP_TOKEN, struct.pack("<H", 5)))
    r = stub_token_result(5, vocab)
    assert struct.unpack(P.TOKEN_REPLY_FORMAT, f.payload) == (r.next_token, r.cycles, r.core_busy_cycles)
    f, = await transact(P.encode_frame(P.OP_LOGITS))
    assert list(struct.unpack(f"<{vocab}h", f.payload)) == [stub_logit(5, i) for i in range(vocab)]

    # garbage before a frame, a truncated frame before a good one: each answered with BAD_CRC,
    # then the good frame answered normally (the link receives while the error goes out)
    token = P.encode_frame(P.OP_TOKEN, struct.pack("<H", vocab - 1))
    err, f = await transact(garbage(rng, 9) + token, n_replies=2)
    assert err.opcode == P.OP_ERROR and err.payload[0] == E.BAD_CRC
    assert f.opcode == P.OP_TOKEN | P.REPLY
    err, f = await transact(frames[1][:20] + P.encode_frame(P.OP_INFO), n_replies=2)
    assert is_error(err, E.BAD_CRC, P.OP_LOAD) and P.Info.unpack(f.payload) == info

    # a frame over MAX_PAYLOAD, a token out of range
    f, = await transact(P.encode_frame(P.OP_LOAD, bytes(P.MAX_PAYLOAD + 1)))
    assert is_error(f, E.BAD_LENGTH, P.OP_LOAD)
    f, = await transact(P.encode_frame(P.OP_TOKEN, struct.pack("<H", vocab)))
    assert is_error(f, E.BAD_TOKEN, P.OP_TOKEN)

    for _ in range(30 * divisor):                       # nothing more comes out
        await RisingEdge(dut.clk)
    assert len(host.received) == expected_len, "the board sent more bytes than expected"
    assert int(dut.rx_errors.value) == 0 and int(dut.rx_overruns.value) == 0
