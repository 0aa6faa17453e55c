# amaranth: UnusedElaboratable=no
# (the tests of rejected parameters build components that are never elaborated)
"""The link layer (hdl/link.py) with the StubCore test double: Amaranth-simulator tests at the
byte streams (every reply byte compared with the one Python model of a board,
sim/refboard.ReferenceBoard with the StubExecutor, and field by field with mmfree.protocol), one
at the UART pins, and the cocotb/Icarus test at the UART pins."""

import dataclasses
import random
import struct
import zlib

import pytest
from amaranth.sim import Simulator

from mmfree import protocol as P
from mmfree.hdl.link import (BODY_MAX, INFO_LEN, LinkLayer, SerialCRC, StubBoard,
                             core_port_members, link_core_members, stub_image, stub_logit,
                             stub_token_result)
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb
from mmfree.sim.tb_link import (TEST_INFO, StubLink, corrupt, garbage, load_done, load_frames,
                                random_byte_session, random_session, stub_board, uart_bits)

E = P.Error
MEM = TEST_INFO.memory_bytes


def run_link(requests, *, idle=0.0, stall=0.0, seed=0, load_stall=False, info=TEST_INFO):
    """Send every request (raw line bytes) into a StubLink's ``i_rx`` (random idle cycles),
    take ``o_tx`` (random back-pressure), and compare the whole output with the oracle,
    ReferenceBoard with the StubExecutor; then model_ok, the memory and the stub's counters.
    Returns ``(replies, model, state)``: ``replies[k]`` = the frames answering request k,
    ``state`` = the ports and the stub's memory at the end."""
    model = stub_board(info)
    want = [model.feed(r) for r in requests]
    want_all = b"".join(want)
    data = b"".join(requests)
    dut = StubLink(info, load_stall=load_stall)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = bytearray()
    state = {}

    async def sink(ctx):
        rng = random.Random(seed + 1)
        while True:
            ready = not (stall and rng.random() < stall)
            ctx.set(dut.o_tx.ready, ready)
            _, _, p, v = await ctx.tick().sample(dut.o_tx.payload, dut.o_tx.valid)
            if ready and v:
                got.append(p)

    async def host(ctx):
        rng = random.Random(seed)
        for b in data:
            while idle and rng.random() < idle:
                await ctx.tick()
            ctx.set(dut.i_rx.payload, b)
            ctx.set(dut.i_rx.valid, 1)
            await ctx.tick().until(dut.i_rx.ready)
            ctx.set(dut.i_rx.valid, 0)
        timeout = 40 * len(want_all) + 2000
        while len(got) < len(want_all) and timeout:
            await ctx.tick()
            timeout -= 1
        await ctx.tick().repeat(300)                    # nothing more may come out
        link, core = dut.link, dut.core
        state.update(model_ok=ctx.get(link.model_ok), resets=ctx.get(core.resets),
                     tokens=ctx.get(core.tokens), vocab=ctx.get(core.vocab_size),
                     mem=bytes(ctx.get(core.mem.data[i]) for i in range(info.memory_bytes)))

    sim.add_testbench(sink, background=True)
    sim.add_testbench(host)
    sim.run()
    if bytes(got) != want_all:
        first = next((i for i, (a, b) in enumerate(zip(got, want_all)) if a != b),
                     min(len(got), len(want_all)))
        print("got frames ", P.FrameDecoder().feed(bytes(got)))
        print("want frames", P.FrameDecoder().feed(want_all))
        raise AssertionError(f"line bytes differ from the model from byte {first} "
                             f"(got {len(got)}, want {len(want_all)} bytes)")
    assert state["model_ok"] == model.model_ok and state["mem"] == bytes(model.memory)
    stub = model.executor                               # the stub's counters are 8 bits wide
    assert (state["resets"], state["tokens"]) == (stub.resets % 256, stub.tokens % 256)
    decoder = P.FrameDecoder()
    replies = [decoder.feed(w) for w in want]
    assert all(f.status == "ok" for r in replies for f in r)
    return replies, model, state


def frame(op, payload=b""):
    return P.encode_frame(op, payload)


def load(address, data):
    return frame(P.OP_LOAD, struct.pack(P.LOAD_HEADER_FORMAT, address) + data)


def token(t):
    return frame(P.OP_TOKEN, struct.pack(P.TOKEN_REQUEST_FORMAT, t))


def single(replies):
    assert all(len(r) == 1 for r in replies), [len(r) for r in replies]
    return [r[0] for r in replies]


def slip(body: bytes) -> bytes:
    """SLIP-frame a raw body (no CRC added)."""
    escaped = body.replace(bytes([P.ESC]), bytes([P.ESC, P.ESC_ESC])).replace(
        bytes([P.END]), bytes([P.ESC, P.ESC_END]))
    return bytes([P.END]) + escaped + bytes([P.END])


def bad_crc(op, payload=b""):
    body = bytes([op]) + payload
    return slip(body + struct.pack("<H", P.crc16(body) ^ 0x0100))


def is_error(f, code, opcode):
    return f.opcode == P.OP_ERROR and f.payload == bytes([code, opcode])


def test_info_reply():
    """INFO answers info.pack() (TEST_INFO's config hash 0xC0DBC0DB forces escapes)."""
    f, = single(run_link([frame(P.OP_INFO)])[0])
    assert f.opcode == P.OP_INFO | P.REPLY and len(f.payload) == INFO_LEN
    assert P.Info.unpack(f.payload) == TEST_INFO
    other = P.Info(b"MMFA", P.PROTOCOL_VERSION, 8, 1, 12_000_000, 115_200, 4096, 64, 128, 256, 2, 3)
    f, = single(run_link([frame(P.OP_INFO)], info=other)[0])
    assert P.Info.unpack(f.payload) == other


@pytest.mark.parametrize("idle,stall,load_stall,seed", [(0.0, 0.0, False, 1), (0.3, 0.4, True, 2)])
def test_load_token_logits_session(idle, stall, load_stall, seed):
    """LOAD in several chunks (1..LOAD_CHUNK bytes, END/ESC-rich data), LOAD_DONE with a wrong
    CRC, a wrong length, then the right ones; TOKEN layout, LOGITS, RESET_STATE; a new LOAD
    clears model_ok."""
    print("seed", seed)
    vocab = 37
    image = stub_image(vocab, 700, seed=seed)
    image = image[:3] + bytes([P.END, P.ESC, P.ESC_END, P.ESC_ESC, P.END]) + image[8:]
    sizes = [P.LOAD_CHUNK, 1, 100, 87]
    loads = load_frames(image, sizes)
    tokens = [0, vocab - 1, 19, 5]
    requests = ([token(1), frame(P.OP_LOGITS)] + loads
                + [load_done(image[:-1] + b"\x00"), token(1), load_done(image[:-1]), load_done(image)]
                + [x for t in tokens for x in (token(t), frame(P.OP_LOGITS))]
                + [frame(P.OP_RESET_STATE), load(0, image[:1]), token(0)])
    replies, model, state = run_link(requests, idle=idle, stall=stall, seed=seed, load_stall=load_stall)
    r = single(replies)
    assert is_error(r[0], E.NO_MODEL, P.OP_TOKEN) and is_error(r[1], E.NO_MODEL, P.OP_LOGITS)
    pos = 0
    for k, f in enumerate(r[2:2 + len(loads)]):
        address, length, crc = struct.unpack(P.LOAD_REPLY_FORMAT, f.payload)
        size = min(sizes[k % len(sizes)], len(image) - pos)
        assert f.opcode == P.OP_LOAD | P.REPLY and (address, length) == (pos, size)
        assert crc == P.crc16(image[pos:pos + size])
        pos += size
    rest = r[2 + len(loads):]
    assert is_error(rest[0], E.IMAGE_CRC, P.OP_LOAD_DONE)                  # wrong CRC
    assert is_error(rest[1], E.NO_MODEL, P.OP_TOKEN)
    assert is_error(rest[2], E.IMAGE_CRC, P.OP_LOAD_DONE)                  # wrong length
    assert rest[3].opcode == P.OP_LOAD_DONE | P.REPLY and rest[3].payload == b""
    for k, t in enumerate(tokens):
        ft, fl = rest[4 + 2 * k], rest[5 + 2 * k]
        want = stub_token_result(t, vocab)
        assert ft.opcode == P.OP_TOKEN | P.REPLY
        assert struct.unpack(P.TOKEN_REPLY_FORMAT, ft.payload) == (
            want.next_token, want.cycles, want.core_busy_cycles)
        assert fl.opcode == P.OP_LOGITS | P.REPLY and len(fl.payload) == 2 * vocab
        assert list(struct.unpack(f"<{vocab}h", fl.payload)) == [stub_logit(t, i) for i in range(vocab)]
    assert rest[-3].opcode == P.OP_RESET_STATE | P.REPLY and rest[-3].payload == b""
    assert rest[-2].opcode == P.OP_LOAD | P.REPLY
    assert is_error(rest[-1], E.NO_MODEL, P.OP_TOKEN)                      # LOAD cleared model_ok
    assert state["mem"][:len(image)] == image and state["resets"] == 1
    assert state["tokens"] == len(tokens) and not state["model_ok"]


def test_every_error():
    """Each error code, with the offending opcode; refused requests change nothing."""
    vocab = 9
    image = stub_image(vocab, 40, seed=3)
    good = load_frames(image, [40])
    short_body = bytes([P.END, P.OP_INFO, 0x12, P.END])                   # 2 bytes: no CRC
    requests = [
        bad_crc(P.OP_INFO),                                                 # 0 BAD_CRC
        short_body,                                                         # 1 BAD_CRC
        frame(0x00), frame(P.OP_ERROR, b"\x01\x02"), frame(P.OP_INFO | P.REPLY),   # 2-4 BAD_OPCODE
        frame(P.OP_INFO, b"\x00"), frame(P.OP_RESET_STATE, b"\x00"),        # 5-6 BAD_LENGTH
        frame(P.OP_LOGITS, b"\x00\x00"), frame(P.OP_TOKEN, b"\x00"),
        frame(P.OP_TOKEN, b"\x00\x00\x00"), frame(P.OP_LOAD_DONE, bytes(7)),
        frame(P.OP_LOAD_DONE, bytes(9)), load(0, b""),                      # ... 12
        load(0, bytes(P.LOAD_CHUNK + 1)),                                   # 13 over the buffer
        token(0), frame(P.OP_LOGITS),                                       # 14-15 NO_MODEL
        load(MEM - 1, b"\x01\x02"), load(MEM, b"\x01"),                     # 16-18 BAD_ADDRESS
        load(0xFFFFFFFF, b"\x01"),
        load(MEM - 2, b"\x01\x02"),                                         # 19 fits exactly
        load(MEM - P.LOAD_CHUNK, bytes(range(P.LOAD_CHUNK))),               # 20 largest frame
        load_done(b""),                                                     # 21 IMAGE_CRC (count)
        *good,                                                              # 22 new image
        load_done(image + b"\x00"),                                         # 23 IMAGE_CRC (length)
        load_done(image),                                                   # 24 ok
        token(vocab), token(0xFFFF),                                        # 25-26 BAD_TOKEN
        token(vocab - 1),                                                   # 27 ok
    ]
    replies, model, state = run_link(requests, seed=4)
    r = single(replies)
    want = ([(E.BAD_CRC, P.OP_INFO)] * 2
            + [(E.BAD_OPCODE, 0x00), (E.BAD_OPCODE, P.OP_ERROR), (E.BAD_OPCODE, P.OP_INFO | P.REPLY)]
            + [(E.BAD_LENGTH, op) for op in (P.OP_INFO, P.OP_RESET_STATE, P.OP_LOGITS, P.OP_TOKEN,
                                             P.OP_TOKEN, P.OP_LOAD_DONE, P.OP_LOAD_DONE, P.OP_LOAD,
                                             P.OP_LOAD)]
            + [(E.NO_MODEL, P.OP_TOKEN), (E.NO_MODEL, P.OP_LOGITS)]
            + [(E.BAD_ADDRESS, P.OP_LOAD)] * 3)
    for k, (code, op) in enumerate(want):
        assert is_error(r[k], code, op), (k, r[k])
    assert r[19].opcode == r[20].opcode == P.OP_LOAD | P.REPLY
    assert is_error(r[21], E.IMAGE_CRC, P.OP_LOAD_DONE)
    assert is_error(r[23], E.IMAGE_CRC, P.OP_LOAD_DONE)
    assert r[24].opcode == P.OP_LOAD_DONE | P.REPLY
    assert is_error(r[25], E.BAD_TOKEN, P.OP_TOKEN) and is_error(r[26], E.BAD_TOKEN, P.OP_TOKEN)
    assert r[27].opcode == P.OP_TOKEN | P.REPLY
    # refused LOADs wrote nothing: memory holds the accepted ones (19, 20, 22) only
    mem = bytearray(MEM)
    mem[MEM - 2:] = b"\x01\x02"
    mem[MEM - P.LOAD_CHUNK:] = bytes(range(P.LOAD_CHUNK))
    mem[:len(image)] = image
    assert state["mem"] == bytes(mem) and state["model_ok"]


def test_model_mismatch():
    """LOAD_DONE with a good CRC but a header that does not fit: the core's header_ok low,
    V = 0, V > max_vocab; V = max_vocab fits."""
    cases = [stub_image(5, 20, header_ok=False, seed=1), stub_image(0, 20, seed=2),
             stub_image(TEST_INFO.max_vocab + 1, 20, seed=3), stub_image(TEST_INFO.max_vocab, 20, seed=4)]
    requests = [x for img in cases for x in (load(0, img), load_done(img))]
    r = single(run_link(requests, seed=5)[0])
    for k in range(3):
        assert is_error(r[2 * k + 1], E.MODEL_MISMATCH, P.OP_LOAD_DONE), k
    assert r[7].opcode == P.OP_LOAD_DONE | P.REPLY


def test_resynchronization():
    """Garbage before a frame, truncated frames (also cut after an ESC), a body over the
    buffer, and empty frames: each non-empty body gets one error reply, the next frame is
    answered normally, empty frames get none."""
    rng = random.Random(6)
    info = frame(P.OP_INFO)
    loads = load_frames(stub_image(9, 300, seed=6), [P.LOAD_CHUNK, 44])
    esc_cut = bytes([P.END, P.OP_LOAD, 0, 0, P.ESC])
    requests = [
        garbage(rng, 12) + info,
        loads[0][:100] + info,
        esc_cut + info,
        bytes([P.END]) * 4 + info,
        garbage(rng, BODY_MAX + 40) + info,
        bytes([P.END]) + bytes(BODY_MAX + 1) + bytes([P.END]) + info,      # one byte over
        loads[1][:-3] + loads[1],                 # the CRC cut off by the next frame
    ]
    replies, model, _ = run_link(requests, idle=0.2, stall=0.3, seed=6)
    assert [len(r) for r in replies] == [2, 2, 2, 1, 2, 2, 2]
    for k in (0, 1, 2):
        assert replies[k][0].opcode == P.OP_ERROR and replies[k][0].payload[0] == E.BAD_CRC
    assert replies[1][0].payload[1] == P.OP_LOAD
    assert replies[4][0].opcode == P.OP_ERROR and replies[4][0].payload[0] == E.BAD_LENGTH
    assert is_error(replies[5][0], E.BAD_LENGTH, 0)
    assert is_error(replies[6][0], E.BAD_CRC, P.OP_LOAD)
    for k in range(6):
        assert P.Info.unpack(replies[k][-1].payload) == TEST_INFO
    assert replies[6][1].opcode == P.OP_LOAD | P.REPLY


def test_corrupted_chunk_is_refused_then_resent():
    """A chunk with a bad CRC is refused with BAD_CRC, not written and not counted; its
    resend is accepted and the image's CRC-32 then matches."""
    vocab = 20
    image = stub_image(vocab, 300, seed=8)
    loads = load_frames(image, [128])
    bad = corrupt(loads[1], random.Random(8))
    requests = [loads[0], bad, loads[1], loads[2], load_done(image), token(3)]
    replies, model, state = run_link(requests, seed=8, load_stall=True)
    r = single(replies)
    assert r[1].opcode == P.OP_ERROR and r[1].payload[0] == E.BAD_CRC
    assert [f.opcode for f in r] == [P.OP_LOAD | P.REPLY, P.OP_ERROR, P.OP_LOAD | P.REPLY,
                                     P.OP_LOAD | P.REPLY, P.OP_LOAD_DONE | P.REPLY,
                                     P.OP_TOKEN | P.REPLY]
    # the refused frame alone: nothing of it reaches memory
    replies, model, state = run_link([loads[0], bad], seed=9)
    assert state["mem"][128:256] == bytes(128) and state["mem"][:128] == image[:128]


@pytest.mark.parametrize("seed,idle,stall,load_stall", [(119, 0.0, 0.0, False), (129, 0.3, 0.3, True)])
def test_random_sessions_match_model(seed, idle, stall, load_stall):
    """Random mixes of good and bad requests: every line byte equals the oracle's."""
    print("seed", seed)
    rng = random.Random(seed)
    requests = random_session(rng, TEST_INFO, 45)
    replies, model, state = run_link(requests, idle=idle, stall=stall, seed=seed, load_stall=load_stall)
    frames = [f for r in replies for f in r]
    opcodes = {f.opcode for f in frames}
    errors = {f.payload[0] for f in frames if f.opcode == P.OP_ERROR}
    print("replies", len(frames), "opcodes", sorted(opcodes), "errors", sorted(errors))
    # the session reached the interesting states: a loaded model, tokens, most errors
    assert {P.OP_TOKEN | P.REPLY, P.OP_LOGITS | P.REPLY, P.OP_LOAD_DONE | P.REPLY} <= opcodes
    assert len(errors) >= 6


@pytest.mark.parametrize("seed,pieces,idle,stall,load_stall", [(32, 70, 0.0, 0.0, False),
                                                              (52, 90, 0.3, 0.3, True)])
def test_random_byte_session_matches_reference(seed, pieces, idle, stall, load_stall):
    """The same random byte session (tb_link.random_byte_session: garbage, frames cut short or
    with bytes replaced, loads in and out of order, tokens, every error) through LinkLayer +
    StubCore and through ReferenceBoard(StubExecutor): the reply byte streams are equal, and
    so are model_ok, the memory and the stub's counters (run_link)."""
    print("seed", seed)
    rng = random.Random(seed)
    requests = random_byte_session(rng, TEST_INFO, pieces)
    replies = run_link(requests, idle=idle, stall=stall, seed=seed, load_stall=load_stall)[0]
    frames = [f for r in replies for f in r]
    opcodes = {f.opcode for f in frames}
    errors = {f.payload[0] for f in frames if f.opcode == P.OP_ERROR}
    print(len(b"".join(requests)), "bytes,", len(frames), "replies, opcodes", sorted(opcodes),
          "errors", sorted(errors))
    # the session reached the interesting states: loaded models, tokens, every error but one
    assert {P.OP_LOAD | P.REPLY, P.OP_LOAD_DONE | P.REPLY, P.OP_TOKEN | P.REPLY,
            P.OP_LOGITS | P.REPLY} <= opcodes
    assert len(errors) >= 7


def test_image_check_follows_arrival_order():
    """LOAD_DONE checks the count and CRC-32 of the data of the LOADs accepted since the last
    LOAD to address 0, in arrival order; LOAD_DONE does not restart them; a failed LOAD_DONE
    (also one with a wrong payload length) clears model_ok; each LOAD reply's crc16 is over its
    data bytes."""
    vocab = 11
    image = stub_image(vocab, 150, seed=13)
    c0, c1, c2 = load_frames(image, [50])
    part = [image[:50], image[50:100], image[100:]]

    def done_over(*data):
        blob = b"".join(data)
        return frame(P.OP_LOAD_DONE, struct.pack(P.LOAD_DONE_FORMAT, len(blob), zlib.crc32(blob)))

    requests = [
        c0, c1, c1, c2, load_done(image),               # 0-4: chunk 1 counted twice → IMAGE_CRC
        done_over(part[0], part[1], part[1], part[2]),  # 5: what arrived → accepted
        token(3), load_done(image),                     # 6-7: TOKEN ok; IMAGE_CRC (no restart)
        token(3),                                       # 8: the failed LOAD_DONE cleared model_ok
        c0, c1, c2, load_done(image), load_done(image),  # 9-13: a fresh image, LOAD_DONE twice ok
        c1, c2, load_done(image),                       # 14-16: no LOAD to 0: the count goes on
        c2, c0, done_over(part[0]),                     # 17-19: LOAD to 0 restarts: only c0 counts
        token(4), frame(P.OP_LOAD_DONE, bytes(7)), token(4),    # 20-22: BAD_LENGTH clears model_ok
    ]
    r = single(run_link(requests, seed=13)[0])
    ok = [P.OP_LOAD_DONE | P.REPLY]
    assert is_error(r[4], E.IMAGE_CRC, P.OP_LOAD_DONE) and r[5].opcode in ok
    assert r[6].opcode == P.OP_TOKEN | P.REPLY and is_error(r[7], E.IMAGE_CRC, P.OP_LOAD_DONE)
    assert is_error(r[8], E.NO_MODEL, P.OP_TOKEN)
    assert r[12].opcode in ok and r[13].opcode in ok
    assert is_error(r[16], E.IMAGE_CRC, P.OP_LOAD_DONE) and r[19].opcode in ok
    assert r[20].opcode == P.OP_TOKEN | P.REPLY and is_error(r[21], E.BAD_LENGTH, P.OP_LOAD_DONE)
    assert is_error(r[22], E.NO_MODEL, P.OP_TOKEN)
    chunk_of = {c0: 0, c1: 1, c2: 2}
    for k, req in enumerate(requests):
        if req in chunk_of:
            n = chunk_of[req]
            assert r[k].payload == struct.pack(P.LOAD_REPLY_FORMAT, 50 * n, len(part[n]), P.crc16(part[n]))


def test_damaged_body_naming_load_done_keeps_the_model():
    """A damaged body whose first byte is OP_LOAD_DONE (garbage, a LOAD_DONE cut short, a body
    over the buffer) is no LOAD_DONE: it is answered (BAD_CRC / BAD_LENGTH) and changes
    nothing, so the loaded model stays."""
    vocab = 9
    image = stub_image(vocab, 40, seed=14)
    cut = load_done(image)[:6]
    requests = [*load_frames(image, [40]), load_done(image), token(1),
                bytes([P.OP_LOAD_DONE, 0x11, 0x22]), token(2),       # garbage
                cut, token(3),                                          # a LOAD_DONE cut short
                bytes([P.END, P.OP_LOAD_DONE]) + bytes(BODY_MAX) + bytes([P.END]), token(4)]
    r = [f for reply in run_link(requests, seed=14)[0] for f in reply]
    assert [f.opcode for f in r[4::2]] == [P.OP_TOKEN | P.REPLY] * 3


def test_serial_crcs():
    """SerialCRC.crc16 = protocol.crc16 and SerialCRC.crc32 (final XOR) = zlib.crc32, with
    clears between messages."""
    rng = random.Random(10)
    messages = [b"123456789", b"", bytes([0xFF] * 5)] + [
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 30))) for _ in range(5)]
    for dut, reference in ((SerialCRC.crc16(), P.crc16),
                           (SerialCRC.crc32(), lambda m: zlib.crc32(m) ^ 0xFFFFFFFF)):
        sim = Simulator(dut)
        sim.add_clock(1e-6)
        got = []

        async def tb(ctx):
            for msg in messages:
                ctx.set(dut.clear, 1)
                await ctx.tick()
                ctx.set(dut.clear, 0)
                for b in msg:
                    ctx.set(dut.i_stream.payload, b)
                    ctx.set(dut.i_stream.valid, 1)
                    await ctx.tick().until(dut.i_stream.ready)
                    ctx.set(dut.i_stream.valid, 0)
                await ctx.tick().until(dut.i_stream.ready)
                got.append(ctx.get(dut.crc))

        sim.add_testbench(tb)
        sim.run()
        assert got == [reference(msg) for msg in messages]
    assert P.crc16(b"123456789") == 0x29B1


def test_reset_state_waits_for_the_core():
    """RESET_STATE strobes reset_state for one cycle and answers only once ready_state is
    back (the stub holds it low for 6 cycles)."""
    dut = StubLink(TEST_INFO)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    events = []

    async def monitor(ctx):
        cycle = 0
        async for _, _, strobe, rs, tv, tr in ctx.tick().sample(
                dut.link.reset_state, dut.link.ready_state, dut.o_tx.valid, dut.o_tx.ready):
            cycle += 1
            if strobe:
                events.append(("strobe", cycle))
            if not rs:
                events.append(("busy", cycle))
            if tv and tr:
                events.append(("tx", cycle))

    async def host(ctx):
        ctx.set(dut.o_tx.ready, 1)
        for b in frame(P.OP_RESET_STATE):
            ctx.set(dut.i_rx.payload, b)
            ctx.set(dut.i_rx.valid, 1)
            await ctx.tick().until(dut.i_rx.ready)
        ctx.set(dut.i_rx.valid, 0)
        await ctx.tick().repeat(200)

    sim.add_testbench(monitor, background=True)
    sim.add_testbench(host)
    sim.run()
    strobes = [c for e, c in events if e == "strobe"]
    busy = [c for e, c in events if e == "busy"]
    tx = [c for e, c in events if e == "tx"]
    assert len(strobes) == 1 and busy == list(range(strobes[0] + 1, strobes[0] + 7))
    assert tx and tx[0] > busy[-1]


def test_uart_pins_garbage_then_frame():
    """At the UART pins (8 cycles per bit, ±1 % rate error per character): garbage, then INFO
    sent right away, then a TOKEN without a model; the link receives INFO while the BAD_CRC
    reply to the garbage goes out, so nothing overruns."""
    info = TEST_INFO
    dut = StubBoard(info)
    divisor = round(info.clock_hz / info.baud)
    rng = random.Random(12)
    requests = [garbage(rng, 6) + frame(P.OP_INFO), token(2)]
    model = stub_board(info)
    want_parts = [model.feed(r) for r in requests]
    want = b"".join(want_parts)
    clk = 1e-6
    sim = Simulator(dut)
    sim.add_clock(clk)
    got = []

    async def host_tx(ctx):
        ctx.set(dut.uart_rx, 1)
        await ctx.tick().repeat(5)
        for k, req in enumerate(requests):
            while len(got) < sum(len(w) for w in want_parts[:k]):    # the replies so far
                await ctx.tick()
            for byte in req:
                bit_s = divisor * clk * (1 + rng.uniform(-0.01, 0.01))
                await ctx.delay(rng.uniform(0, 1) * clk)
                for level in uart_bits(byte):
                    ctx.set(dut.uart_rx, level)
                    await ctx.delay(bit_s)

    async def cycles(ctx, n):           # plain ticks: a background testbench may end anywhere
        for _ in range(n):
            await ctx.tick()

    async def host_rx(ctx):
        while True:
            while ctx.get(dut.uart_tx):
                await ctx.tick()
            await cycles(ctx, divisor // 2)
            assert not ctx.get(dut.uart_tx)
            byte = 0
            for i in range(8):
                await cycles(ctx, divisor)
                byte |= ctx.get(dut.uart_tx) << i
            await cycles(ctx, divisor)
            assert ctx.get(dut.uart_tx), "stop bit"
            got.append(byte)

    async def watchdog(ctx):
        cycles = 0
        while len(got) < len(want) and cycles < 20 * divisor * (len(want) + 60):
            await ctx.tick()
            cycles += 1
        await ctx.tick().repeat(20 * divisor)
        got.append((ctx.get(dut.rx_errors), ctx.get(dut.rx_overruns)))

    sim.add_testbench(host_tx, background=True)
    sim.add_testbench(host_rx, background=True)
    sim.add_testbench(watchdog)
    sim.run()
    counters = got.pop()
    assert bytes(got) == want and counters == (0, 0)
    frames = P.FrameDecoder().feed(bytes(got))
    assert [f.opcode for f in frames] == [P.OP_ERROR, P.OP_INFO | P.REPLY, P.OP_ERROR]
    assert frames[0].payload[0] == E.BAD_CRC and is_error(frames[2], E.NO_MODEL, P.OP_TOKEN)


def test_core_interface_helpers():
    """core_port_members is link_core_members with every direction flipped."""
    link = link_core_members(MEM, 40)
    core = core_port_members(MEM, 40)
    assert set(link) == set(core) == {"load", "start", "done", "reset_state", "ready_state",
                                      "logit_addr", "logit_data", "model_ok", "vocab_size",
                                      "header_ok"}
    for name in link:
        assert core[name].flow != link[name].flow
    assert link["load"].signature.members["payload"].shape.size == 10 + 8


@pytest.mark.parametrize("change,message", [
    ({"protocol": 2}, "implements protocol version 1, the Info says 2"),
    ({"memory_bytes": 1}, "memory_bytes must be at least 2"),
    ({"max_vocab": 1}, "max_vocab must be at least 2"),
    ({"max_vocab": 70000}, "does not pack into INFO_FORMAT"),
    ({"magic": b"MMF"}, "magic must be 4 bytes"),
])
def test_link_rejects_bad_info(change, message):
    with pytest.raises(ValueError, match=message):
        LinkLayer(dataclasses.replace(TEST_INFO, **change))
    with pytest.raises(ValueError, match="needs a mmfree.protocol.Info"):
        LinkLayer({"memory_bytes": 10})


def test_link_cocotb(tmp_path):
    """cocotb + Icarus at the UART pins of StubBoard: sim/tb_link.py."""
    if not icarus_available():
        pytest.fail(ICARUS_MISSING)
    seed = 4242
    print("seed", seed)
    run_cocotb(StubBoard(TEST_INFO, load_stall=True), "stub_board", "mmfree.sim.tb_link",
               tmp_path, params={"seed": seed}, seed=seed)
