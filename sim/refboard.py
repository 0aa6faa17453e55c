"""The reference model of an mmfree board's link behaviour: the executable specification that the
gateware link layer (hdl/uart.py, hdl/link.py) implements, in plain Python.

It is **not** the simulated board: that is the compiled gateware (sim/board.py). This model
answers exactly as docs/protocol.md says a board must, byte in, bytes out, and runs tokens on the
golden model, so the host library, the CLI and their tests have a board to talk to, and the
gateware's tests have an oracle for every reply.

- :class:`ReferenceBoard`: ``feed(bytes) -> bytes`` (the reply frames those bytes caused).
  Every opcode and error of :mod:`mmfree.protocol`: SLIP framing with resynchronization on END,
  CRC-16, the one-frame receive buffer (a frame longer than ``MAX_PAYLOAD + 3`` bytes is answered
  BAD_LENGTH), LOAD into a byte memory of ``info.memory_bytes`` bytes, LOAD_DONE with a CRC-32
  over the stored bytes and a check of the image against the hardware, TOKEN/LOGITS/RESET_STATE.
- :func:`serve_tcp`: the model behind a TCP port on 127.0.0.1, one client at a time, so any
  pyserial user reaches it as ``socket://127.0.0.1:PORT``. From a shell:
  ``python -m mmfree.sim.refboard --port 5555``.

Tokens run on the uploaded device image (firmware/image.py) with the firmware interpreter
(``mmfree.firmware.interpreter.Interpreter``), whose logits equal the golden model's bit for bit
and whose cycle counts are the sequencer's cost model.
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

from mmfree.protocol import (ERROR_FORMAT, LOAD_CHUNK, LOAD_DONE_FORMAT,
                             LOAD_HEADER_FORMAT, LOAD_REPLY_FORMAT, MAX_PAYLOAD, OP_ERROR, OP_INFO,
                             OP_LOAD, OP_LOAD_DONE, OP_LOGITS, OP_RESET_STATE, OP_TOKEN,
                             REPLY, TOKEN_REPLY_FORMAT, TOKEN_REQUEST_FORMAT,
                             Error, Frame, FrameDecoder, Info, crc16, encode_frame)

__all__ = ["ReferenceBoard", "ReferenceServer", "serve_tcp", "default_info"]


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


class _Executor:
    """The loaded image on ``mmfree.firmware.interpreter.Interpreter``, which checks the image's
    header against the hardware as LOAD_DONE must (ImageError, a ValueError → MODEL_MISMATCH);
    its cycle counters are the sequencer's cost model (firmware/interpreter.py CostModel)."""

    def __init__(self, image: bytes, info: Info):
        from mmfree.firmware.interpreter import Interpreter
        from mmfree.host.board import hardware_from_info
        # BitstreamMismatch (ValueError) → MODEL_MISMATCH: INFO that no configuration produces
        self.interp = Interpreter(image, hardware_from_info(info))
        self.vocab_size = int(self.interp.header.vocab)

    def reset_state(self):
        self.interp.reset_state()

    def step(self, token: int):
        """(int16 logits [V], next token, cycles, core busy cycles)."""
        logits, next_token = self.interp.step(token)
        return logits, int(next_token), int(self.interp.last_cycles), int(self.interp.last_core_busy)


class ReferenceBoard:
    """A board's protocol behaviour, one frame at a time (docs/protocol.md is its prose).

    ``info``: what INFO answers and the limits the board enforces (memory size, lanes, maxima);
    :func:`default_info` when omitted. Fault-injection hooks for tests: ``rx_hook(bytes) ->
    bytes`` sees every chunk of received bytes before the receiver does (corrupt the wire);
    ``store_hook(address, data) -> data`` sees what a good LOAD frame is about to store
    (corrupt the memory). ``requests`` counts good frames by opcode, ``errors`` error answers by
    code. Memory starts zeroed here; on hardware, bytes never loaded are undefined.

    Rules, in the order the board checks them: a frame whose CRC fails (or that is shorter than
    opcode + CRC) → BAD_CRC; longer than the receive buffer → BAD_LENGTH; unknown opcode →
    BAD_OPCODE; payload length wrong for the opcode → BAD_LENGTH; then the opcode's own checks.
    Every frame gets exactly one reply frame (empty frames get none); a refused request changes
    nothing. A LOAD that is carried out invalidates the loaded model until the next good
    LOAD_DONE.
    """

    def __init__(self, info: Info | None = None, *, rx_hook=None, store_hook=None):
        self.info = info or default_info()
        self.rx_hook, self.store_hook = rx_hook, store_hook
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self.power_up()

    def power_up(self):
        """The state after configuration: empty receiver, zeroed memory, no model."""
        self._rx = FrameDecoder(max_body=MAX_PAYLOAD + 3)
        self.memory = bytearray(self.info.memory_bytes)
        self._exec = None                       # set by a good LOAD_DONE
        self._logits = None

    @property
    def model_loaded(self) -> bool:
        return self._exec is not None

    def feed(self, data: bytes) -> bytes:
        """Receive ``data``; return the bytes of the reply frames it caused."""
        if self.rx_hook:
            data = self.rx_hook(bytes(data))
        return b"".join(self.handle(frame) for frame in self._rx.feed(data))

    def handle(self, frame: Frame) -> bytes:
        """The reply frame (encoded) to one received frame."""
        op = frame.opcode
        if frame.status == "crc":
            return self._error(Error.BAD_CRC, op)
        if frame.status == "overflow":
            return self._error(Error.BAD_LENGTH, op)
        handler = {OP_INFO: self._info, OP_LOAD: self._load, OP_LOAD_DONE: self._load_done,
                   OP_RESET_STATE: self._reset_state, OP_TOKEN: self._token,
                   OP_LOGITS: self._logits_reply}.get(op)
        if handler is None:
            return self._error(Error.BAD_OPCODE, op)
        self.requests[op] += 1
        result = handler(frame.payload)
        if isinstance(result, int):
            return self._error(result, op)
        return encode_frame(op | REPLY, result)

    # ------------------------------------------------------------------ opcodes
    # Each returns the reply payload, or an Error code.

    def _info(self, payload: bytes):
        return Error.BAD_LENGTH if payload else self.info.pack()

    def _load(self, payload: bytes):
        header = struct.calcsize(LOAD_HEADER_FORMAT)
        if not header < len(payload) <= header + LOAD_CHUNK:
            return Error.BAD_LENGTH
        (address,) = struct.unpack_from(LOAD_HEADER_FORMAT, payload)
        data = payload[header:]
        if address + len(data) > len(self.memory):
            return Error.BAD_ADDRESS
        self._exec = None                       # the image changes: no model until LOAD_DONE
        if self.store_hook:
            data = self.store_hook(address, data)
        self.memory[address:address + len(data)] = data
        stored = bytes(self.memory[address:address + len(data)])
        return struct.pack(LOAD_REPLY_FORMAT, address, len(data), crc16(stored))

    def _load_done(self, payload: bytes):
        if len(payload) != struct.calcsize(LOAD_DONE_FORMAT):
            return Error.BAD_LENGTH
        length, crc = struct.unpack(LOAD_DONE_FORMAT, payload)
        if not 0 < length <= len(self.memory) or zlib.crc32(self.memory[:length]) != crc:
            return Error.IMAGE_CRC
        try:
            self._exec = _Executor(bytes(self.memory[:length]), self.info)
        except (ValueError, ImportError):
            return Error.MODEL_MISMATCH
        self._logits = np.zeros(self._exec.vocab_size, dtype=np.int64)
        return b""

    def _reset_state(self, payload: bytes):
        if payload:
            return Error.BAD_LENGTH
        if self._exec is not None:
            self._exec.reset_state()
        return b""

    def _token(self, payload: bytes):
        if len(payload) != struct.calcsize(TOKEN_REQUEST_FORMAT):
            return Error.BAD_LENGTH
        if self._exec is None:
            return Error.NO_MODEL
        (token,) = struct.unpack(TOKEN_REQUEST_FORMAT, payload)
        if token >= self._exec.vocab_size:
            return Error.BAD_TOKEN
        self._logits, next_token, cycles, busy = self._exec.step(token)
        return struct.pack(TOKEN_REPLY_FORMAT, next_token, cycles, busy)

    def _logits_reply(self, payload: bytes):
        if payload:
            return Error.BAD_LENGTH
        if self._exec is None:
            return Error.NO_MODEL
        return np.asarray(self._logits, dtype="<i2").tobytes()

    def _error(self, code: int, opcode: int) -> bytes:
        self.errors[code] += 1
        return encode_frame(OP_ERROR, struct.pack(ERROR_FORMAT, code, opcode))


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
