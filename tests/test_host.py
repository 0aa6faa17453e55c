"""Tests of the host library (host/link.py, host/board.py), `mmfree run` and the reference model of
the board's protocol behaviour (sim/refboard.py), over real TCP sockets on 127.0.0.1 (and
loop://), against the golden model bit for bit."""

import re
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from mmfree import protocol
from mmfree.host.board import (BitstreamMismatch, Board, LoadFailed, ModelDoesNotFit, build_image,
                               check_fits, hardware_from_info)
from mmfree.host.cli import main
from mmfree.host.link import (ERROR_CLASSES, BadCrcError, BoardError, BoardNotResponding,
                              GarbledReplies, Link)
from mmfree.models import arith
from mmfree.models.boardfile import read_board_model, write_board_model
from mmfree.models.config import ModelConfig
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import quantize_model
from mmfree.models.sampling import Sampler
from mmfree.protocol import (END, ERRORS, ESC, LOAD_CHUNK, OP_ERROR, OP_INFO, OP_LOAD, OP_LOAD_DONE,
                             OP_LOGITS, OP_RESET_STATE, OP_TOKEN, REPLY, Error, FrameDecoder, Info,
                             encode_frame)
from mmfree.sim.refboard import ReferenceBoard, default_info, serve_tcp

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models/shipped/tiny-fortunes/tiny-fortunes.mmf"


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("MMFREE_DEBUG", raising=False)


@pytest.fixture
def serve():
    """``serve(board=None) -> ReferenceServer``; every server is closed after the test."""
    servers = []

    def start(board=None):
        servers.append(serve_tcp(0, board))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def shipped():
    return read_board_model(SHIPPED)


@pytest.fixture(scope="module")
def small_models(tmp_path_factory, make_tensors):
    """A byte-level model of other dimensions packed for 16 lanes (file), and a V = 97 model
    packed for 8 lanes."""
    print("seeds 41, 42")
    root = tmp_path_factory.mktemp("host")
    cfg = ModelConfig(256, 48, 3, 80)
    byte_model = write_board_model(quantize_model(cfg, make_tensors(cfg, 41), lanes=16), root / "small16.mmf")
    cfg97 = ModelConfig(97, 40, 2, 56)
    return byte_model, quantize_model(cfg97, make_tensors(cfg97, 42), lanes=8)


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_error(capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv)
    assert (rc, err) == (1, f"mmfree: error: {message}\n"), err
    assert "Traceback" not in out + err
    return out


def frames_of(data: bytes):
    return FrameDecoder(max_body=1 << 18).feed(data)


def error_frame(code: int, opcode: int) -> bytes:
    return encode_frame(OP_ERROR, bytes([code, opcode]))


class FakeBoard:
    """A TCP server on 127.0.0.1 that answers every chunk of received bytes with
    ``respond(bytes) -> bytes`` (scripted misbehaviour the reference model never shows)."""

    def __init__(self, respond):
        self.respond = respond
        self.received = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"socket://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.05)
                while not self._stop.is_set():
                    try:
                        data = conn.recv(4096)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    self.received += data
                    conn.sendall(self.respond(data))

    def close(self):
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request_frames(data: bytes):
    """The good request frames in ``data`` (for FakeBoard responders)."""
    return [f for f in FrameDecoder().feed(data) if f.status == "ok"]


# --------------------------------------------------------------------------- docs

def test_docs_cover_protocol():
    """Every opcode, error code (with its sentence) and payload format of protocol.py is in
    docs/protocol.md with its value."""
    doc = (ROOT / "docs/protocol.md").read_text()
    opcodes = {k: v for k, v in vars(protocol).items() if k.startswith("OP_")}
    assert len(opcodes) == 7
    for name, value in opcodes.items():
        assert re.search(rf"^\| `{name}` \| 0x{value:02X} \|", doc, re.M), name
    errors = {k: v for k, v in vars(Error).items() if k.isupper()}
    assert set(errors.values()) == set(ERRORS)
    for name, code in errors.items():
        assert re.search(rf"^\| {code} \| `{name}` \| {re.escape(ERRORS[code])} \|", doc, re.M), name
    for name in ("INFO_FORMAT", "LOAD_HEADER_FORMAT", "LOAD_REPLY_FORMAT", "LOAD_DONE_FORMAT",
                 "TOKEN_REQUEST_FORMAT", "TOKEN_REPLY_FORMAT", "ERROR_FORMAT"):
        assert f"`{name}` = `{getattr(protocol, name)}`" in doc, name
    for name in ("MAX_PAYLOAD", "LOAD_CHUNK", "PROTOCOL_VERSION", "REPLY"):
        assert name in doc
    assert f"`MAX_PAYLOAD` = {protocol.MAX_PAYLOAD}" in doc
    assert f"`LOAD_CHUNK` ({LOAD_CHUNK})" in doc
    assert f"`DEFAULT_BAUD` = {protocol.DEFAULT_BAUD:,}" in doc
    assert f"Protocol version: **{protocol.PROTOCOL_VERSION}**" in doc
    assert f'`INFO_MAGIC` = `{protocol.INFO_MAGIC!r}`'.replace("'", '"') in doc
    assert f"0x{protocol.crc16(b'123456789'):04X}" in doc


# --------------------------------------------------------------------------- mmfree run

STATS = re.compile(r"(\d+) prompt \+ (\d+) generated tokens in ([\d.]+) s: ([\d.]+) tokens/s over the link; "
                   r"device: ([\d,]+) cycles/token \(ternary core busy (\d+)%\), ([\d,.]+) tokens/s at ([\d.]+) MHz\n")


def test_run_matches_generate_shipped(serve, capsys):
    server = serve()
    prompt = "The meaning of life is"
    rc, want, err = run_cli(capsys, "generate", "--model", SHIPPED, "--greedy", "--max-tokens", 64, prompt)
    assert rc == 0 and err == ""
    rc, out, err = run_cli(capsys, "run", "--port", server.url, "--model", SHIPPED, "--greedy",
                           "--max-tokens", 64, prompt)
    assert rc == 0 and out == want
    m = STATS.fullmatch(err)
    assert m, err
    assert (int(m[1]), int(m[2])) == (len(prompt), 64)
    cycles_per_token = float(m[5].replace(",", ""))
    info = server.board.info
    from mmfree.firmware.interpreter import Interpreter       # the device's counters: its cost model
    interp = Interpreter(device_image(read_board_model(SHIPPED), info), hardware_from_info(info))
    interp.step(0)
    assert cycles_per_token == interp.last_cycles
    assert int(m[6]) == round(100 * interp.last_core_busy / interp.last_cycles)
    assert float(m[8]) == info.clock_hz / 1e6
    assert float(m[7].replace(",", "")) == pytest.approx(info.clock_hz / cycles_per_token, rel=1e-3)
    # one TOKEN per prompt token and per generated token but the last
    assert server.board.requests[OP_TOKEN] == len(prompt) + 63
    assert server.board.requests[OP_LOGITS] == 0            # greedy uses the board's argmax


def test_run_small_model_other_dimensions(serve, small_models, capsys):
    path, _ = small_models
    server = serve(ReferenceBoard(default_info(lanes=16)))
    for sampling in (["--greedy"], ["--temperature", "0.9", "--seed", "5"]):
        argv = ["--model", path, *sampling, "--max-tokens", 40, "Hello, board"]
        rc, want, _ = run_cli(capsys, "generate", *argv)
        assert rc == 0
        rc, out, err = run_cli(capsys, "run", "--port", server.url, *argv)
        assert rc == 0 and out == want and STATS.fullmatch(err), (sampling, err)
    assert server.board.requests[OP_LOGITS] == len("Hello, board") + 39     # temperature run


def test_logits_bit_exact(serve, small_models):
    """TOKEN's next token and LOGITS equal IntegerModel's after every token; RESET_STATE
    restarts from zero; a refused TOKEN changes nothing."""
    _, qm = small_models
    server = serve(ReferenceBoard(default_info(lanes=8)))
    golden = IntegerModel(qm)
    rng = np.random.default_rng(7)
    print("seed 7")
    tokens = [int(t) for t in rng.integers(0, 97, 12)]
    with Board(server.url, timeout=5) as board:
        board.load(qm, progress=False)
        for _ in range(2):
            state = golden.new_state()
            for t in tokens:
                want, state = golden.step(t, state)
                result = board.step(t)
                assert result.next_token == int(np.argmax(want))
                got = board.logits()
                assert got.dtype == np.int16 and np.array_equal(got, want)
                with pytest.raises(BoardError):          # BAD_TOKEN: state untouched
                    board.step(97)
            board.reset()
        assert board.totals.tokens == 2 * len(tokens)
        assert board.totals.cycles >= board.totals.core_busy_cycles > 0
        # generate() with a temperature sampler: the golden loop on the same logits
        got = list(board.generate([3, 1, 4], 10, Sampler(1.3, 9)))
        state = golden.new_state()
        from mmfree.models.sampling import generate_tokens

        def step(tok):
            logits, state[:] = golden.step(tok, state)
            return golden.dequantize(logits)
        assert got == list(generate_tokens(step, [3, 1, 4], 10, Sampler(1.3, 9)))


# --------------------------------------------------------------------------- every error answer

def device_image(qm, info: Info) -> bytes:
    """What the host uploads for ``qm`` to a bitstream that reports ``info``."""
    return bytes(build_image(qm, hardware_from_info(info)).data)


def loaded_board(qm, info) -> ReferenceBoard:
    board = ReferenceBoard(info)
    image = device_image(qm, info)
    for a in range(0, len(image), LOAD_CHUNK):
        board.feed(encode_frame(OP_LOAD, struct.pack("<I", a) + image[a:a + LOAD_CHUNK]))
    reply = frames_of(board.feed(encode_frame(OP_LOAD_DONE, struct.pack("<II", len(image), zlib.crc32(image)))))
    assert reply[0].opcode == OP_LOAD_DONE | REPLY
    return board


def test_error_answers_raw(small_models):
    """Each error, byte for byte, from the reference model (the gateware's oracle)."""
    _, qm = small_models
    info = default_info(lanes=8, memory_bytes=64 * 1024)
    image = device_image(qm, info)
    fresh = ReferenceBoard(info)

    def answer(board, frame_bytes):
        frames = frames_of(board.feed(frame_bytes))
        assert len(frames) == 1 and frames[0].status == "ok"
        return frames[0]

    def assert_error(board, frame_bytes, code, opcode):
        f = answer(board, frame_bytes)
        assert (f.opcode, f.payload) == (OP_ERROR, bytes([code, opcode])), (code, f)

    good = encode_frame(OP_INFO)
    bad_crc = good[:-2] + bytes([good[-2] ^ 1]) + good[-1:]
    assert_error(fresh, bad_crc, Error.BAD_CRC, OP_INFO)
    assert_error(fresh, bytes([END, OP_TOKEN, 0x12, END]), Error.BAD_CRC, OP_TOKEN)      # too short
    for op in (0x00, 0x07, 0x42, OP_ERROR, OP_INFO | REPLY, 0xFF):
        assert_error(fresh, encode_frame(op), Error.BAD_OPCODE, op)
    for op, payload in ((OP_INFO, b"x"), (OP_LOAD, b"\0" * 4), (OP_LOAD_DONE, b"\0" * 7),
                        (OP_LOAD_DONE, b"\0" * 9), (OP_RESET_STATE, b"x"), (OP_TOKEN, b"\0"),
                        (OP_TOKEN, b"\0" * 3), (OP_LOGITS, b"xy")):
        assert_error(fresh, encode_frame(op, payload), Error.BAD_LENGTH, op)
    # a frame longer than the receive buffer (a LOAD of 257 bytes, and 1000 bytes of anything)
    assert_error(fresh, encode_frame(OP_LOAD, bytes(4 + LOAD_CHUNK + 1)), Error.BAD_LENGTH, OP_LOAD)
    assert_error(fresh, encode_frame(OP_TOKEN, bytes(1000)), Error.BAD_LENGTH, OP_TOKEN)
    assert_error(fresh, encode_frame(OP_TOKEN, b"\1\0"), Error.NO_MODEL, OP_TOKEN)
    assert_error(fresh, encode_frame(OP_LOGITS), Error.NO_MODEL, OP_LOGITS)
    assert_error(fresh, encode_frame(OP_LOAD, struct.pack("<I", info.memory_bytes - 1) + b"ab"),
                 Error.BAD_ADDRESS, OP_LOAD)
    assert_error(fresh, encode_frame(OP_LOAD, struct.pack("<I", 1 << 31) + b"a"), Error.BAD_ADDRESS, OP_LOAD)
    # LOAD_DONE's length and CRC-32 are checked against the data of the LOADs accepted since the
    # last LOAD to address 0, in arrival order: before any LOAD, that is nothing
    assert_error(fresh, encode_frame(OP_LOAD_DONE, struct.pack("<II", 0, 0)), Error.MODEL_MISMATCH, OP_LOAD_DONE)
    ok = answer(fresh, encode_frame(OP_LOAD, struct.pack("<I", info.memory_bytes - 2) + b"ab"))
    assert ok.payload == struct.pack("<IHH", info.memory_bytes - 2, 2, protocol.crc16(b"ab"))
    for length, crc in ((0, 0), (info.memory_bytes + 1, 0), (16, 12345), (2, zlib.crc32(b"ab") ^ 1),
                        (3, zlib.crc32(b"ab"))):
        assert_error(fresh, encode_frame(OP_LOAD_DONE, struct.pack("<II", length, crc)), Error.IMAGE_CRC, OP_LOAD_DONE)
    assert_error(fresh, encode_frame(OP_LOAD_DONE, struct.pack("<II", 2, zlib.crc32(b"ab"))),
                 Error.MODEL_MISMATCH, OP_LOAD_DONE)        # the image check passed (2 bytes "ab")
    # a good CRC over an image that is no model, and over an image built for other hardware
    assert answer(fresh, encode_frame(OP_LOAD, struct.pack("<I", 0) + bytes(16))).opcode == OP_LOAD | REPLY
    assert_error(fresh, encode_frame(OP_LOAD_DONE, struct.pack("<II", 16, zlib.crc32(bytes(16)))),
                 Error.MODEL_MISMATCH, OP_LOAD_DONE)
    for small in (default_info(lanes=8, max_d=32), default_info(lanes=16), default_info(lanes=8, max_vocab=96)):
        board = ReferenceBoard(small)
        for a in range(0, len(image), LOAD_CHUNK):
            board.feed(encode_frame(OP_LOAD, struct.pack("<I", a) + image[a:a + LOAD_CHUNK]))
        assert_error(board, encode_frame(OP_LOAD_DONE, struct.pack("<II", len(image), zlib.crc32(image))),
                     Error.MODEL_MISMATCH, OP_LOAD_DONE)
        assert_error(board, encode_frame(OP_TOKEN, b"\1\0"), Error.NO_MODEL, OP_TOKEN)
    board = loaded_board(qm, info)
    assert_error(board, encode_frame(OP_TOKEN, struct.pack("<H", 97)), Error.BAD_TOKEN, OP_TOKEN)
    assert_error(board, encode_frame(OP_TOKEN, struct.pack("<H", 0xFFFF)), Error.BAD_TOKEN, OP_TOKEN)
    assert answer(board, encode_frame(OP_TOKEN, struct.pack("<H", 96))).opcode == OP_TOKEN | REPLY
    # a refused LOAD changes nothing; a LOAD carried out invalidates the model
    assert_error(board, encode_frame(OP_LOAD, struct.pack("<I", 1 << 20) + b"a"), Error.BAD_ADDRESS, OP_LOAD)
    assert answer(board, encode_frame(OP_LOGITS)).opcode == OP_LOGITS | REPLY
    assert answer(board, encode_frame(OP_LOAD, struct.pack("<I", 0) + image[:1])).opcode == OP_LOAD | REPLY
    assert_error(board, encode_frame(OP_LOGITS), Error.NO_MODEL, OP_LOGITS)
    assert_error(board, encode_frame(OP_TOKEN, b"\1\0"), Error.NO_MODEL, OP_TOKEN)
    # empty frames get no answer
    assert fresh.feed(bytes([END, END, END])) == b""


def test_error_answers_through_link(serve, small_models):
    """Every error code reaches the caller as its BoardError subclass with the ERRORS sentence."""
    _, qm = small_models
    server = serve(ReferenceBoard(default_info(lanes=8)))
    cases = [(0x42, b"", Error.BAD_OPCODE), (OP_INFO, b"x", Error.BAD_LENGTH),
             (OP_TOKEN, b"\0\0", Error.NO_MODEL), (OP_LOAD, struct.pack("<I", 1 << 30) + b"a", Error.BAD_ADDRESS),
             (OP_LOAD_DONE, struct.pack("<II", 8, 1), Error.IMAGE_CRC),
             (OP_LOAD_DONE, struct.pack("<II", 8, zlib.crc32(bytes(8))), Error.MODEL_MISMATCH)]
    with Link(server.url, timeout=2) as link:
        assert link.request(OP_LOAD, struct.pack("<I", 0) + bytes(8)) == struct.pack(
            "<IHH", 0, 8, protocol.crc16(bytes(8)))                 # the 8 bytes LOAD_DONE checks
        for opcode, payload, code in cases:
            with pytest.raises(ERROR_CLASSES[code]) as exc:
                link.request(opcode, payload)
            assert (str(exc.value), exc.value.code, exc.value.opcode) == (ERRORS[code], code, opcode)
    with Board(server.url) as board:
        board.load(qm, progress=False)
        with pytest.raises(ERROR_CLASSES[Error.BAD_TOKEN], match=f"^{ERRORS[Error.BAD_TOKEN]}$"):
            board.step(200)
    # BAD_CRC: the wire corrupts every frame: resent `retries` times, then raised
    server.board.rx_hook = lambda data: bytes(b ^ 0x01 if b not in (END, ESC, END ^ 1, ESC ^ 1) else b for b in data)
    with Link(server.url, timeout=2, retries=2) as link:
        with pytest.raises(BadCrcError, match=f"^{ERRORS[Error.BAD_CRC]}$"):
            link.request(OP_INFO)
        assert link.resends == 2
    assert set(ERROR_CLASSES) == set(ERRORS)


def test_unknown_error_code_and_stale_replies():
    """Replies to other opcodes, errors (but BAD_CRC) about other opcodes and empty frames
    before the reply are skipped; an unknown error code still raises a BoardError."""
    info = default_info().pack()

    def respond(data):
        out = b""
        for f in request_frames(data):
            if f.opcode == OP_INFO:
                out += (bytes([END, END]) + encode_frame(OP_LOAD | REPLY, bytes(8))
                        + error_frame(Error.NO_MODEL, OP_TOKEN) + encode_frame(OP_INFO | REPLY, info))
            elif f.opcode == OP_RESET_STATE:
                out += error_frame(99, OP_RESET_STATE)
        return out

    with FakeBoard(respond) as fake, Link(fake.url, timeout=1) as link:
        assert link.request(OP_INFO) == info and link.resends == 0
        with pytest.raises(BoardError, match="^the board answered with unknown error code 99$"):
            link.request(OP_RESET_STATE)


class OnceHook:
    """rx_hook: applies ``change`` to the first received chunk that holds a frame of ``opcode``."""

    def __init__(self, opcode: int, change):
        self.opcode, self.change, self.done = opcode, change, False

    def __call__(self, data: bytes) -> bytes:
        if not self.done and bytes([END, self.opcode]) in data:
            self.done = True
            return self.change(data)
        return data


def test_bad_crc_naming_another_opcode(serve, small_models):
    """A BAD_CRC answer about another opcode: an idempotent request is sent again at once; a
    TOKEN only when no reply came by the timeout, so it is executed exactly once either way."""
    _, qm = small_models
    server = serve(ReferenceBoard(default_info(lanes=8)))
    golden = IntegerModel(qm)
    with Board(server.url, timeout=0.5) as b:
        b.load(qm, progress=False)
        b.reset()
        state = golden.new_state()
        hit = lambda d: d.replace(bytes([END, OP_TOKEN]), bytes([END, OP_TOKEN ^ 1]), 1)  # noqa: E731
        cases = [("TOKEN opcode hit", OP_TOKEN, hit, 1),
                 ("noise before TOKEN", OP_TOKEN, lambda d: b"\x33" + d, 0),
                 ("noise before INFO", OP_INFO, lambda d: b"\x33" + d, 1)]
        for what, opcode, change, resends in cases:
            server.board.rx_hook = OnceHook(opcode, change)
            before = (b.link.resends, server.board.requests[OP_TOKEN])
            t0 = time.monotonic()
            if opcode == OP_TOKEN:
                want, state = golden.step(7, state)
                assert b.step(7).next_token == int(np.argmax(want)), what
                assert np.array_equal(b.logits(), want), what
                assert server.board.requests[OP_TOKEN] == before[1] + 1, what      # executed once
            else:
                b._info = None
                assert b.info() == server.board.info
            assert server.board.rx_hook.done and b.link.resends == before[0] + resends, what
            waited = time.monotonic() - t0
            assert (waited >= 0.5) == (what == "TOKEN opcode hit"), (what, waited)


# --------------------------------------------------------------------------- resynchronization

def test_garbage_before_a_frame(serve):
    board = ReferenceBoard()
    garbage = bytes([0x11, 0x22, ESC, 0x33, ESC, 0xDC, 0x44])
    frames = frames_of(board.feed(garbage + encode_frame(OP_INFO)))
    assert [(f.opcode, f.payload) for f in frames] == [(OP_ERROR, bytes([Error.BAD_CRC, 0x11])),
                                                      (OP_INFO | REPLY, board.info.pack())]
    assert frames_of(board.feed(encode_frame(OP_INFO)))[0].opcode == OP_INFO | REPLY
    # over TCP: garbage in one connection, then a Board in the next
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(garbage + encode_frame(OP_INFO))
        got = b""
        while len(frames_of(got)) < 2:
            got += s.recv(4096)
        assert [f.opcode for f in frames_of(got)] == [OP_ERROR, OP_INFO | REPLY]
        s.sendall(garbage)                                  # left in the board's receiver
    with Board(server.url) as b:
        assert b.info() == server.board.info and b.link.resends == 0


def test_truncated_frame_then_a_good_one(serve, shipped):
    board = ReferenceBoard()
    truncated = encode_frame(OP_TOKEN, b"\x41\x00")[:-3]
    frames = frames_of(board.feed(truncated + encode_frame(OP_INFO)))
    assert [(f.opcode, f.payload) for f in frames] == [(OP_ERROR, bytes([Error.BAD_CRC, OP_TOKEN])),
                                                      (OP_INFO | REPLY, board.info.pack())]
    # A truncated TOKEN left in the receiver by an interrupted session: Board's opening sync
    # flushes it, so its BAD_CRC is not taken for the answer to the first TOKEN (which would
    # send that TOKEN twice).
    server = serve()
    with Board(server.url) as b:
        b.load(shipped, progress=False)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(truncated)
        time.sleep(0.05)
    with Board(server.url) as b:
        assert list(b.generate(list(b"Hi"), 5)) == greedy_golden(shipped, b"Hi", 5)
        assert b.link.resends == 0
    assert server.board.requests[OP_TOKEN] == 2 + 4


def greedy_golden(qm, prompt: bytes, n: int) -> list[int]:
    m = IntegerModel(qm)
    state, out = m.new_state(), []
    for t in prompt:
        logits, state = m.step(t, state)
    for k in range(n):
        out.append(int(np.argmax(logits)))
        if k + 1 < n:
            logits, state = m.step(out[-1], state)
    return out


# --------------------------------------------------------------------------- LOAD integrity

class CorruptNthLoad:
    """rx_hook: passes whole frames on; flips one data bit in the ``n``-th LOAD frame (once)."""

    def __init__(self, n: int):
        self.n, self.loads, self._pending = n, 0, bytearray()

    def __call__(self, data: bytes) -> bytes:
        self._pending += data
        cut = self._pending.rfind(END) + 1
        out, self._pending = bytearray(self._pending[:cut]), self._pending[cut:]
        for start in [i for i, b in enumerate(out) if b == END]:
            if start + 1 < len(out) and out[start + 1] == OP_LOAD:
                self.loads += 1
                if self.loads == self.n:
                    k = start + 10                       # inside the data, clear of END/ESC
                    while out[k] in (END, ESC, END ^ 1, ESC ^ 1):
                        k += 1
                    out[k] ^= 1
        return bytes(out)


def test_load_chunk_corrupted_on_the_wire_is_resent(serve, shipped):
    hook = CorruptNthLoad(3)
    server = serve(ReferenceBoard(rx_hook=hook))
    image = device_image(shipped, server.board.info)
    chunks = -(-len(image) // LOAD_CHUNK)
    with Board(server.url) as b:
        b.load(SHIPPED, progress=False)
        assert b.link.resends == 1 and b.load_restarts == 0
        assert list(b.generate(list(b"Wire"), 8)) == greedy_golden(shipped, b"Wire", 8)
    assert server.board.errors == {Error.BAD_CRC: 1}
    assert server.board.requests[OP_LOAD] == chunks and hook.loads == chunks + 1
    assert bytes(server.board.memory[:len(image)]) == image


def test_load_chunk_stored_wrong_restarts_the_upload(serve, shipped):
    """A LOAD reply whose CRC-16 says other bytes went to memory than were sent: the chunk was
    accepted (and counted by the image check), so the upload starts again from address 0."""
    faults = []

    def store_hook(address, data):
        if address == 2 * LOAD_CHUNK and not faults:
            faults.append(address)
            return bytes([data[0] ^ 0x80]) + data[1:]
        return data

    server = serve(ReferenceBoard(store_hook=store_hook))
    image = device_image(shipped, server.board.info)
    chunks = -(-len(image) // LOAD_CHUNK)
    with Board(server.url) as b:
        b.load(shipped, progress=False)
        assert (b.load_restarts, b.link.resends) == (1, 0)
        assert list(b.generate(list(b"Mem"), 8)) == greedy_golden(shipped, b"Mem", 8)
    assert server.board.requests[OP_LOAD] == 3 + chunks and server.board.requests[OP_LOAD_DONE] == 1
    assert bytes(server.board.memory[:len(image)]) == image
    # a link buffer that always hands other bytes to the memory: three uploads, then one sentence
    server.board.store_hook = lambda address, data: bytes(len(data))
    server.board.requests.clear()
    with Board(server.url) as b, pytest.raises(LoadFailed) as exc:
        b.load(shipped, progress=False)
    assert str(exc.value) == (f"the board at {server.url} did not take the model image in 3 attempts "
                              "(the last time the board reported other bytes than were sent at address 0); "
                              "its memory or link is faulty")
    assert b.load_restarts == 2 and server.board.requests == {OP_INFO: 1, OP_LOAD: 3}


class NthLoadReply:
    """tx_hook: applies ``change`` to the ``n``-th reply to a LOAD (once)."""

    def __init__(self, n: int, change):
        self.n, self.change, self.seen = n, change, 0

    def __call__(self, data: bytes) -> bytes:
        if data[:2] == bytes([END, OP_LOAD | REPLY]):
            self.seen += 1
            if self.seen == self.n:
                return self.change(data)
        return data


@pytest.mark.parametrize("fault", ["corrupted", "lost"])
def test_load_reply_corrupted_or_lost_restarts_the_upload(serve, shipped, fault):
    """The reply to an accepted LOAD arrives corrupted or not at all: the chunk is not sent
    again (a second copy would make the image check fail), the upload starts again from 0."""
    def flip(data):                                 # a payload byte, clear of END and ESC
        k = next(i for i in range(3, len(data)) if data[i] not in (END, ESC, END ^ 1, ESC ^ 1))
        return data[:k] + bytes([data[k] ^ 1]) + data[k + 1:]

    change = flip if fault == "corrupted" else (lambda data: b"")
    server = serve(ReferenceBoard(tx_hook=NthLoadReply(5, change)))
    image = device_image(shipped, server.board.info)
    chunks = -(-len(image) // LOAD_CHUNK)
    with Board(server.url, timeout=1) as b:
        t0 = time.monotonic()
        b.load(shipped, progress=False)
        assert (time.monotonic() - t0 >= 1) == (fault == "lost")
        assert (b.load_restarts, b.link.resends) == (1, 0)
        assert list(b.generate(list(b"Re"), 6)) == greedy_golden(shipped, b"Re", 6)
    assert server.board.requests[OP_LOAD] == 5 + chunks and server.board.errors == {}


def test_image_crc_restarts_the_upload(serve, shipped):
    """LOAD_DONE answers IMAGE_CRC (here: a copy of chunk 1 reached the board again, unseen by
    the host, as after a lost reply): the upload starts again from address 0 and succeeds."""
    image = device_image(shipped, default_info())
    replay = encode_frame(OP_LOAD, struct.pack("<I", LOAD_CHUNK) + image[LOAD_CHUNK:2 * LOAD_CHUNK])
    done = {"n": 0}

    def rx_hook(data):
        if data.startswith(bytes([END, OP_LOAD_DONE])) and not done["n"]:
            done["n"] += 1
            return replay + data                    # the board accepts chunk 1 a second time
        return data

    server = serve(ReferenceBoard(rx_hook=rx_hook))
    with Board(server.url) as b:
        b.load(shipped, progress=False)
        assert (b.load_restarts, b.link.resends) == (1, 0)
        assert list(b.generate(list(b"Crc"), 6)) == greedy_golden(shipped, b"Crc", 6)
    assert server.board.errors == {Error.IMAGE_CRC: 1} and server.board.requests[OP_LOAD_DONE] == 2


def test_load_progress_bar_across_restarts(serve, shipped, monkeypatch):
    """The progress bar counts the bytes of the current upload: it starts over (and says which
    attempt this is) when the upload restarts, never exceeds the image, and ends full."""
    import tqdm

    events = []

    class Bar:
        def __init__(self, total, desc, **kwargs):
            self.total, self.n = total, 0
            events.append(("open", desc, total))

        def update(self, k):
            self.n += k
            assert self.n <= self.total
            events.append(("update", self.n))

        def reset(self, total=None):
            self.n = 0
            events.append(("reset",))

        def set_description(self, desc):
            events.append(("desc", desc))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(("close", self.n))

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    image = device_image(shipped, default_info())
    server = serve(ReferenceBoard(tx_hook=NthLoadReply(3, lambda data: data[:-3] + data[-2:])))
    with Board(server.url) as b:
        b.load(shipped)
    assert events[0] == ("open", "load", len(image)) and events[-1] == ("close", len(image))
    k = events.index(("reset",))
    assert events[k - 1] == ("update", 2 * LOAD_CHUNK) and events[k + 1] == ("desc", "load (attempt 2/3)")
    assert [e for e in events if e[0] in ("reset", "desc")] == [("reset",), ("desc", "load (attempt 2/3)")]


def test_link_syncs_before_its_first_request(serve):
    """A Link sends a lone END before its first request: a fragment left in the board's
    receiver is answered then (and that answer dropped), not taken for the request's."""
    server = serve()
    for explicit in (False, True):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(bytes([END, OP_INFO, 0x12]))          # an interrupted INFO
            time.sleep(0.05)
        with Link(server.url) as link:
            if explicit:
                link.sync()
            assert link.request(OP_INFO) == server.board.info.pack() and link.resends == 0
            link.request(OP_INFO)
    assert server.board.errors == {Error.BAD_CRC: 2} and server.board.requests[OP_INFO] == 4


# --------------------------------------------------------------------------- no board, wrong baud

def test_board_not_responding(capsys):
    with FakeBoard(lambda data: b"") as fake:
        with Board(fake.url, timeout=0.4) as b, pytest.raises(BoardNotResponding) as exc:
            t0 = time.monotonic()
            b.info()
        elapsed = time.monotonic() - t0
        assert str(exc.value) == (f"no answer from the board at {fake.url} within 0.4 s: is it connected, "
                                  f"programmed with an mmfree bitstream, and at {protocol.DEFAULT_BAUD} baud?")
        assert 0.4 <= elapsed < 1.0
        assert encode_frame(OP_INFO) in fake.received
        assert_cli_error(capsys, ["run", "--port", fake.url, "--model", SHIPPED, "--timeout", "0.3",
                                  "--baud", 115200, "hi"],
                         f"no answer from the board at {fake.url} within 0.3 s: is it connected, "
                         "programmed with an mmfree bitstream, and at 115200 baud?")
    # loop://: the link hears its own request, which is no reply
    with Link("loop://", timeout=0.2) as link, pytest.raises(BoardNotResponding):
        link.request(OP_INFO)


@pytest.mark.parametrize("noise", ["no END", "with END"])
def test_wrong_baud_garbled_replies(capsys, noise):
    rng = np.random.default_rng(11)
    print("seed 11")

    def respond(data):                  # what a UART at the wrong rate makes of the replies
        junk = rng.integers(0, 256, 40, dtype=np.uint8)
        junk[junk == END] = 0x55
        if noise == "with END":
            junk[::13] = END
        return bytes(junk)

    with FakeBoard(respond) as fake:
        message = (f"the replies from {fake.url} are garbled at 9600 baud; is that the rate the "
                   "board's bitstream was built for (set it with --baud)?")
        with pytest.raises(GarbledReplies, match=f"^{re.escape(message)}$"), \
                Board(fake.url, baud=9600, timeout=0.3) as b:
            b.info()
        assert_cli_error(capsys, ["run", "--port", fake.url, "--baud", 9600, "--timeout", 0.3,
                                  "--model", SHIPPED, "hi"], message)


def test_corrupted_replies():
    """A corrupted reply: idempotent requests are repeated, TOKEN is not."""
    info = default_info().pack()
    sent = {"info": 0}

    def respond(data):
        out = b""
        for f in request_frames(data):
            if f.opcode == OP_INFO:
                sent["info"] += 1
                frame = encode_frame(OP_INFO | REPLY, info)
                out += frame if sent["info"] > 1 else frame[:5] + bytes([frame[5] ^ 4]) + frame[6:]
            elif f.opcode == OP_TOKEN:
                frame = encode_frame(OP_TOKEN | REPLY, bytes(10))
                out += frame[:3] + bytes([frame[3] ^ 4]) + frame[4:]
        return out

    with FakeBoard(respond) as fake, Link(fake.url, timeout=1) as link:
        assert link.request(OP_INFO) == info and link.resends == 1
        with pytest.raises(GarbledReplies, match="^the reply to command 0x05 from .* arrived corrupted and "
                                                 "the command cannot be repeated safely; reset the model "
                                                 "state and start again$"):
            link.request(OP_TOKEN, b"\1\0")
        assert sum(f.opcode == OP_TOKEN for f in request_frames(bytes(fake.received))) == 1


def test_no_board_at_the_port(capsys, tmp_path):
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                       # nothing listens there now
    assert_cli_error(capsys, ["run", "--port", f"socket://127.0.0.1:{port}", "--model", SHIPPED, "hi"],
                     f"cannot open socket://127.0.0.1:{port}: connection refused; is the board plugged "
                     "in and is this its port?")
    nodev = tmp_path / "ttyUSB9"
    assert_cli_error(capsys, ["run", "--port", nodev, "--model", SHIPPED, "hi"],
                     f"cannot open {nodev}: no such file or directory; is the board plugged in and is this its port?")


# --------------------------------------------------------------------------- models the bitstream refuses

def test_model_that_does_not_fit_is_refused_before_any_load(serve, shipped, capsys):
    """Too big, wrong lanes, wrong arithmetic version, protocol or device: one sentence each,
    before a single LOAD frame is sent."""
    cases = [
        (default_info(max_d=64), ModelDoesNotFit, None),
        (default_info(max_layers=1), ModelDoesNotFit, None),
        (default_info(memory_bytes=64 * 1024), ModelDoesNotFit, None),
        (default_info(lanes=32), BitstreamMismatch,
         "the model's ternary weights are packed for 16 lanes, the bitstream's core has 32; convert "
         "the checkpoint again with --lanes 32"),
        (default_info(arith_version=arith.ARITH_VERSION + 1), BitstreamMismatch,
         f"the bitstream implements arithmetic version {arith.ARITH_VERSION + 1}, this mmfree's models "
         f"use version {arith.ARITH_VERSION}; build the bitstream with this version of mmfree"),
        (default_info(protocol=protocol.PROTOCOL_VERSION + 1), BitstreamMismatch,
         f"the bitstream at URL speaks link protocol version {protocol.PROTOCOL_VERSION + 1}, this "
         f"mmfree speaks version {protocol.PROTOCOL_VERSION}; build the bitstream with this version of mmfree"),
        (default_info(magic=b"ABCD"), BitstreamMismatch,
         "the device at URL is not an mmfree accelerator (its INFO starts with b'ABCD', not b'MMFA')"),
        (default_info(config_hash=0x1234), BitstreamMismatch,
         "the bitstream's hardware configuration (hash 0x00001234) is not one this mmfree can build "
         "images for; build the bitstream with this version of mmfree"),
    ]
    for info, exc_type, message in cases:
        if message is None and exc_type is ModelDoesNotFit:
            with pytest.raises(ModelDoesNotFit) as want:
                check_fits(shipped, hardware_from_info(info))
            message = str(want.value)
        server = serve(ReferenceBoard(info))
        with Board(server.url) as b, pytest.raises(exc_type) as exc:
            b.load(shipped, progress=False)
        message = message.replace("URL", server.url)
        assert str(exc.value) == message
        assert_cli_error(capsys, ["run", "--port", server.url, "--model", SHIPPED, "hi"], message)
        assert server.board.requests[OP_LOAD] == 0 and server.board.requests[OP_LOAD_DONE] == 0


def test_model_mismatch_answer(serve, capsys):
    """A board that refuses the image at LOAD_DONE (MODEL_MISMATCH) although the host's checks
    passed: the board's sentence."""

    class Overclaiming(ReferenceBoard):             # INFO promises more than the board holds
        def _info_payload(self):
            return default_info().pack()

    server = serve(Overclaiming(default_info(max_d=64)))
    assert_cli_error(capsys, ["run", "--port", server.url, "--model", SHIPPED, "hi"], ERRORS[Error.MODEL_MISMATCH])
    assert server.board.requests[OP_LOAD_DONE] == 1 and server.board.errors == {Error.MODEL_MISMATCH: 1}


# --------------------------------------------------------------------------- CLI details

def test_run_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0 and out.startswith("usage: mmfree run") and err == ""
    for flag in ("--port", "--model", "--baud", "--max-tokens", "--greedy", "--temperature", "--seed", "--timeout"):
        assert flag in out


def test_run_bad_input(serve, capsys, small_models, tmp_path):
    server = serve()
    assert_cli_error(capsys, ["run", "--port", server.url, "--model", tmp_path / "no.mmf", "hi"],
                     f"{tmp_path / 'no.mmf'} does not exist")
    assert_cli_error(capsys, ["run", "--port", server.url, "--model", SHIPPED, "--timeout", 0, "hi"],
                     "--timeout must be positive, not 0")
    assert_cli_error(capsys, ["run", "--port", server.url, "--model", SHIPPED, "--temperature", -1, "hi"],
                     "temperature must be positive, not -1.0")
    v97 = write_board_model(small_models[1], tmp_path / "v97.mmf")
    assert_cli_error(capsys, ["run", "--port", server.url, "--model", v97, "hi"],
                     "text prompts need a byte-level model (vocabulary 256); this model has 97 tokens: "
                     "give token ids instead")
    assert server.board.requests == {}                  # refused before talking to the board
    rc, out, err = run_cli(capsys, "run", "--port", server.url, "--model", SHIPPED, "--max-tokens", 0, "hi")
    assert rc == 0 and out == "hi\n" and err.startswith("2 prompt + 0 generated tokens in ")
