"""The reference model of an mmfree board's link behaviour: the executable specification of the
gateware link layer (hdl/uart.py, hdl/link.py), in plain Python, and the one Python model of a
board's protocol behaviour.

It is **not** the simulated board: that is the compiled gateware (sim/board.py). This model
answers exactly as docs/protocol.md says a board must, byte in, bytes out, so the host library,
the CLI and their tests have a board to talk to, and the gateware's tests have an oracle for
every reply byte (tests/test_link.py compares them).

- :class:`ReferenceBoard`: ``feed(bytes) -> bytes`` (the reply frames those bytes caused). The
  link layer's rules (framing, checks, LOAD and the image check, model_ok) are here; what runs
  the tokens is a pluggable *executor*, the core behind the link:
- :class:`InterpreterExecutor` (the default): the uploaded device image (firmware/image.py) on
  the firmware interpreter (``mmfree.firmware.interpreter.Interpreter``), whose logits equal the
  golden model's bit for bit and whose cycle counts are the sequencer's cost model;
- :class:`StubExecutor`: the Python twin of hdl/link.py's ``StubCore`` test double (vocabulary
  and header from image bytes 0-2, ``stub_token_result``, ``stub_logit``), the oracle of the
  link gateware's tests.
- :func:`serve_tcp`: the model behind a TCP port on 127.0.0.1, one client at a time, so any
  pyserial user reaches it as ``socket://127.0.0.1:PORT``. From a shell:
  ``python -m mmfree.sim.refboard --port 5555``.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import struct
import sys
import threading
import zlib
from collections import Counter

import numpy as np

from mmfree.protocol import (ERROR_FORMAT, LOAD_DONE_FORMAT, LOAD_HEADER_FORMAT,
                             LOAD_REPLY_FORMAT, MAX_PAYLOAD, OP_ERROR, OP_INFO, OP_LOAD,
                             OP_LOAD_DONE, OP_LOGITS, OP_RESET_STATE, OP_TOKEN, REPLY,
                             TOKEN_REPLY_FORMAT, TOKEN_REQUEST_FORMAT, Error, Frame,
                             FrameDecoder, Info, TokenResult, crc16, encode_frame)

__all__ = ["ReferenceBoard", "Executor", "InterpreterExecutor", "StubExecutor", "ReferenceServer",
           "serve_tcp", "default_info", "BODY_MAX"]

BODY_MAX = MAX_PAYLOAD + 3          # the receive buffer: opcode + largest payload + crc16
_LOAD_HEADER = struct.calcsize(LOAD_HEADER_FORMAT)
# payload length of each request opcode; LOAD: more than its header (the buffer bounds the rest)
_PAYLOAD_LENGTH = {OP_INFO: 0, OP_RESET_STATE: 0, OP_LOGITS: 0, OP_LOAD: None,
                   OP_TOKEN: struct.calcsize(TOKEN_REQUEST_FORMAT),
                   OP_LOAD_DONE: struct.calcsize(LOAD_DONE_FORMAT)}


def default_info(**overrides) -> Info:
    """The INFO of a bitstream of the default hardware configuration (``HardwareConfig()``: the
    iCEBreaker build) with ``overrides``: fields of HardwareConfig (lanes, max_d, ..., clock_hz,
    baud; ``memory_bytes`` sets ``weight_words``) change the configuration, and so its
    ``config_hash``; the other Info fields (magic, protocol, config_hash, arith_version) replace
    what INFO reports, to model a foreign or mismatched bitstream."""
    from mmfree.firmware.isa import HardwareConfig
    names = {f.name for f in dataclasses.fields(HardwareConfig)}
    hw = {k: overrides.pop(k) for k in list(overrides) if k in names}
    if "memory_bytes" in overrides:
        hw["weight_words"] = overrides.pop("memory_bytes") // 8
    return dataclasses.replace(HardwareConfig(**hw).info(), **overrides)


# --------------------------------------------------------------------------- executors

class Executor:
    """The core behind the link, as the link layer sees it (hdl/link.py ``link_core_members``).
    :class:`ReferenceBoard` calls, in this order of a board's life:

    - ``power_up(memory, info)``: at configuration. ``memory`` is the board's image memory (a
      ``bytearray`` the board writes the bytes of accepted LOAD frames into; the executor may
      keep and read it), ``info`` the bitstream's INFO.
    - ``vocab_size`` (property): V, the core's ``vocab_size`` port (read for LOAD_DONE's check,
      for TOKEN's BAD_TOKEN check and for LOGITS).
    - ``header_ok(length)``: LOAD_DONE, once the image check passed: the core's verdict on the
      image ``memory[:length]`` (its ``header_ok`` port); the board then also requires
      ``1 <= vocab_size <= info.max_vocab``. An executor that runs real images starts the new
      model here, from a zero state.
    - ``reset_state()``: RESET_STATE (also without a model).
    - ``step(token) -> TokenResult``: TOKEN, only while the model is ok and ``token < vocab_size``.
    - ``logits() -> list of V ints``: LOGITS (only while the model is ok): the last token's int16
      logits, whatever the core holds.
    """

    def power_up(self, memory: bytearray, info: Info) -> None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def header_ok(self, length: int) -> bool:
        raise NotImplementedError

    def reset_state(self) -> None:
        raise NotImplementedError

    def step(self, token: int) -> TokenResult:
        raise NotImplementedError

    def logits(self):
        raise NotImplementedError


class InterpreterExecutor(Executor):
    """The loaded image on ``mmfree.firmware.interpreter.Interpreter`` for the hardware the INFO
    describes (``host.board.hardware_from_info``). ``header_ok`` is the interpreter accepting
    the image (``check_image``; an ImageError or BitstreamMismatch, both ValueErrors, is
    MODEL_MISMATCH); it starts from a zero state, and LOGITS answers zeros until the first
    token. Cycle counts are the sequencer's cost model (firmware/interpreter.py CostModel)."""

    def power_up(self, memory, info):
        self.memory, self.info = memory, info
        self.interp = None
        self._logits = None

    @property
    def vocab_size(self) -> int:
        return int(self.interp.header.vocab) if self.interp is not None else 0

    def header_ok(self, length):
        from mmfree.firmware.interpreter import Interpreter
        from mmfree.host.board import hardware_from_info
        try:
            self.interp = Interpreter(bytes(self.memory[:length]), hardware_from_info(self.info))
        except ValueError:
            self.interp = None
            return False
        self._logits = np.zeros(self.vocab_size, dtype=np.int64)
        return True

    def reset_state(self):
        if self.interp is not None:
            self.interp.reset_state()

    def step(self, token):
        self._logits, next_token = self.interp.step(token)
        return TokenResult(int(next_token), int(self.interp.last_cycles),
                           int(self.interp.last_core_busy))

    def logits(self):
        return [int(v) for v in self._logits]


class StubExecutor(Executor):
    """The Python twin of hdl/link.py's ``StubCore`` test double: V = image bytes 0-1 (u16 LE,
    read live, as the stub's registers follow every load write), ``header_ok`` = image byte 2
    is ``STUB_HEADER_MAGIC``, TOKEN answers ``stub_token_result(token, V)``, LOGITS
    ``stub_logit(last token, i)`` (the last token survives loads; 0 after power-up).
    ``resets`` and ``tokens`` count RESET_STATE strobes and tokens run, like the stub's
    observation ports (which are 8 bits wide: compare modulo 256)."""

    def power_up(self, memory, info):
        self.memory = memory
        self.last_token = self.resets = self.tokens = 0

    @property
    def vocab_size(self) -> int:
        return self.memory[0] | self.memory[1] << 8

    def header_ok(self, length):
        from mmfree.hdl.link import STUB_HEADER_MAGIC
        return self.memory[2] == STUB_HEADER_MAGIC

    def reset_state(self):
        self.resets += 1

    def step(self, token):
        from mmfree.hdl.link import stub_token_result
        self.last_token = token
        self.tokens += 1
        return stub_token_result(token, self.vocab_size)

    def logits(self):
        from mmfree.hdl.link import stub_logit
        return [stub_logit(self.last_token, i) for i in range(self.vocab_size)]


# --------------------------------------------------------------------------- the board

class ReferenceBoard:
    """A board's protocol behaviour, one frame at a time (docs/protocol.md is its prose;
    hdl/link.py ``LinkLayer`` is the gateware that must answer every byte sequence the same).

    ``info``: what INFO answers and the limits the board enforces (memory size, maxima);
    :func:`default_info` when omitted. ``executor``: the core behind the link
    (:class:`Executor`; an :class:`InterpreterExecutor` when omitted).

    Fault-injection hooks for tests: ``rx_hook(bytes) -> bytes`` sees every chunk of received
    bytes before the receiver does (corrupt the wire towards the board); ``store_hook(address,
    data) -> data`` (same length) sees the data bytes of an accepted LOAD frame before they are
    handed to the core (corrupt the link's buffer: memory, the reply's CRC-16 and the image
    check all see the hook's bytes); ``tx_hook(bytes) -> bytes`` sees the reply bytes of each
    :meth:`feed` (corrupt or drop replies). Counters: ``requests`` counts frames with a good CRC
    and a known opcode by opcode, ``errors`` error answers by code.

    State: ``memory`` (zeroed at power-up here; on hardware, bytes never loaded are undefined),
    ``model_ok``, and the image check's ``image_count`` / ``image_crc`` (the running
    ``zlib.crc32``).

    Rules:

    - Frames: SLIP with resynchronization on every END; every non-empty body between two ENDs
      gets exactly one reply frame, empty frames none.
    - Checks, in this order (the first failure is answered ``OP_ERROR, code, body[0]``): body
      over BODY_MAX (= MAX_PAYLOAD + 3) bytes → BAD_LENGTH; body under 3 bytes or bad CRC →
      BAD_CRC; unknown opcode → BAD_OPCODE; payload length wrong for the opcode (LOAD: not
      more than its 4 header bytes) → BAD_LENGTH; TOKEN/LOGITS without ``model_ok`` → NO_MODEL;
      LOAD with address + data length > memory_bytes → BAD_ADDRESS; TOKEN with token >= V →
      BAD_TOKEN; LOAD_DONE: length != image_count, a saturated count, or CRC-32 !=
      image_crc → IMAGE_CRC, then the executor's ``header_ok`` false or V outside
      1..max_vocab → MODEL_MISMATCH.
    - A refused request changes nothing, except that an error answer to a LOAD_DONE frame (one
      that passed the CRC check) clears ``model_ok``.
    - An accepted LOAD writes its data to memory, clears ``model_ok`` and answers ``address,
      length, crc16(data)``. If its address is 0, the image check restarts first (count 0, CRC
      of nothing); then its data bytes are counted (the count saturates at
      ``2 ** (memory_bytes.bit_length() + 1) - 1``) and enter the CRC-32, in arrival order.
      So a chunk accepted twice counts twice. LOAD_DONE does not restart the image check.
    - An accepted LOAD_DONE sets ``model_ok``.
    """

    def __init__(self, info: Info | None = None, *, executor: Executor | None = None,
                 rx_hook=None, store_hook=None, tx_hook=None):
        self.info = info or default_info()
        self.executor = executor if executor is not None else InterpreterExecutor()
        self.rx_hook, self.store_hook, self.tx_hook = rx_hook, store_hook, tx_hook
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self.count_limit = (1 << (self.info.memory_bytes.bit_length() + 1)) - 1
        self.power_up()

    def power_up(self):
        """The state after configuration: empty receiver, zeroed memory, no model, an empty
        image check."""
        self._rx = FrameDecoder(max_body=BODY_MAX)
        self.memory = bytearray(self.info.memory_bytes)
        self.model_ok = False
        self.image_count = 0
        self.image_crc = 0
        self.executor.power_up(self.memory, self.info)

    def feed(self, data: bytes) -> bytes:
        """Receive ``data``; return the bytes of the reply frames it caused."""
        if self.rx_hook:
            data = self.rx_hook(bytes(data))
        out = b"".join(self.handle(frame) for frame in self._rx.feed(data))
        if self.tx_hook and out:
            out = self.tx_hook(out)
        return out

    def handle(self, frame: Frame) -> bytes:
        """The reply frame (encoded) to one received non-empty body."""
        code = self._check(frame)
        if code:
            if frame.opcode == OP_LOAD_DONE and frame.status == "ok":
                self.model_ok = False               # a failed LOAD_DONE
            self.errors[code] += 1
            return encode_frame(OP_ERROR, struct.pack(ERROR_FORMAT, code, frame.opcode))
        return encode_frame(frame.opcode | REPLY, self._execute(frame.opcode, frame.payload))

    def _check(self, frame: Frame) -> int:
        """The first failing check's error code, or 0."""
        if frame.status == "overflow":
            return Error.BAD_LENGTH
        if frame.status == "crc":
            return Error.BAD_CRC
        op, payload = frame.opcode, frame.payload
        if op not in _PAYLOAD_LENGTH:
            return Error.BAD_OPCODE
        self.requests[op] += 1
        want = _PAYLOAD_LENGTH[op]
        if (len(payload) <= _LOAD_HEADER) if want is None else (len(payload) != want):
            return Error.BAD_LENGTH
        if op in (OP_TOKEN, OP_LOGITS) and not self.model_ok:
            return Error.NO_MODEL
        if op == OP_LOAD:
            (address,) = struct.unpack_from(LOAD_HEADER_FORMAT, payload)
            if address + len(payload) - _LOAD_HEADER > self.info.memory_bytes:
                return Error.BAD_ADDRESS
        if op == OP_TOKEN and struct.unpack(TOKEN_REQUEST_FORMAT, payload)[0] >= self.executor.vocab_size:
            return Error.BAD_TOKEN
        if op == OP_LOAD_DONE:
            length, crc = struct.unpack(LOAD_DONE_FORMAT, payload)
            if (length, crc) != (self.image_count, self.image_crc) or self.image_count == self.count_limit:
                return Error.IMAGE_CRC
            if not (self.executor.header_ok(length) and
                    1 <= self.executor.vocab_size <= self.info.max_vocab):
                return Error.MODEL_MISMATCH
        return 0

    def _execute(self, op: int, payload: bytes) -> bytes:
        """Carry out a request that passed every check; its reply payload."""
        if op == OP_INFO:
            return self._info_payload()
        if op == OP_LOAD:
            (address,) = struct.unpack_from(LOAD_HEADER_FORMAT, payload)
            data = payload[_LOAD_HEADER:]
            if self.store_hook:
                data = bytes(self.store_hook(address, data))
                assert len(data) == len(payload) - _LOAD_HEADER, "store_hook must keep the length"
            self.memory[address:address + len(data)] = data
            self.model_ok = False                   # the image changes: no model until LOAD_DONE
            if address == 0:                        # a new image
                self.image_count, self.image_crc = 0, 0
            self.image_count = min(self.image_count + len(data), self.count_limit)
            self.image_crc = zlib.crc32(data, self.image_crc)
            return struct.pack(LOAD_REPLY_FORMAT, address, len(data), crc16(data))
        if op == OP_LOAD_DONE:
            self.model_ok = True
            return b""
        if op == OP_RESET_STATE:
            self.executor.reset_state()
            return b""
        if op == OP_TOKEN:
            r = self.executor.step(struct.unpack(TOKEN_REQUEST_FORMAT, payload)[0])
            return struct.pack(TOKEN_REPLY_FORMAT, r.next_token, r.cycles, r.core_busy_cycles)
        # OP_LOGITS
        return np.asarray(self.executor.logits(), dtype="<i2").tobytes()

    def _info_payload(self) -> bytes:
        """What INFO answers (a test overrides it to model a bitstream that misreports)."""
        return self.info.pack()


# --------------------------------------------------------------------------- TCP server

class ReferenceServer:
    """A :class:`ReferenceBoard` behind a TCP port on 127.0.0.1, served by a daemon thread, one
    client at a time (the next waits until the current one disconnects); the board keeps its
    state across connections, as a powered board does. Use as a context manager or call
    :meth:`close`."""

    def __init__(self, board: ReferenceBoard | None = None, port: int = 0):
        self.board = board or ReferenceBoard()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"refboard:{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def close(self):
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def __enter__(self) -> "ReferenceServer":
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.1)
                while not self._stop.is_set():
                    try:
                        data = conn.recv(4096)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    reply = self.board.feed(data)
                    if reply:
                        try:
                            conn.sendall(reply)
                        except OSError:
                            break


def serve_tcp(port: int = 0, board: ReferenceBoard | None = None) -> ReferenceServer:
    """Start serving ``board`` (a fresh :class:`ReferenceBoard` by default) on
    127.0.0.1:``port`` (0: any free port; read ``.port`` / ``.url``)."""
    return ReferenceServer(board, port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mmfree.sim.refboard",
        description="Serve the reference model of an mmfree board (protocol behaviour + golden "
                    "model; not the gateware) on 127.0.0.1, for `mmfree run --port socket://127.0.0.1:PORT`.")
    p.add_argument("--port", type=int, default=5555, help="TCP port (default 5555)")
    p.add_argument("--lanes", type=int, default=32, choices=(8, 16, 32, 64), help="ternary core lanes (default 32)")
    args = p.parse_args(argv)
    try:
        server = serve_tcp(args.port, ReferenceBoard(default_info(lanes=args.lanes)))
    except OSError as exc:
        print(f"refboard: error: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"reference board listening on {server.url} (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
