"""The host↔board link: the single source of truth for framing, CRC, opcodes, error codes and
payload layouts. Plain Python (no Amaranth): the gateware generator and the host library both
import it. docs/protocol.md explains it.

Link: UART 8N1 (DEFAULT_BAUD unless the bitstream was built for another rate).

Framing: SLIP-style byte stuffing. A frame is ``END body END`` with ``END`` and ``ESC`` inside
the body escaped as ``ESC ESC_END`` and ``ESC ESC_ESC``. The leading END also terminates any
garbage or truncated frame before it, so the receiver resynchronizes on the next frame; empty
frames (two ENDs in a row) are ignored.

Body: ``opcode (1 byte) | payload (0..MAX_PAYLOAD bytes) | crc16 (2 bytes, little-endian)``,
CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor) over opcode and
payload. The board answers every request frame with exactly one frame: ``opcode | 0x80`` and
its reply payload, or ``OP_ERROR`` with ``error code, offending opcode``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_BAUD", "END", "ESC", "ESC_END", "ESC_ESC", "MAX_PAYLOAD",
    "LOAD_CHUNK", "OP_INFO", "OP_LOAD", "OP_LOAD_DONE", "OP_RESET_STATE", "OP_TOKEN",
    "OP_LOGITS", "OP_ERROR", "REPLY", "ERRORS", "Error", "crc16", "encode_frame", "Frame", "FrameDecoder",
    "Info", "TokenResult", "INFO_FORMAT", "TOKEN_REPLY_FORMAT", "LOAD_HEADER_FORMAT",
    "LOAD_REPLY_FORMAT", "LOAD_DONE_FORMAT", "TOKEN_REQUEST_FORMAT", "ERROR_FORMAT", "INFO_MAGIC",
]

PROTOCOL_VERSION = 1
DEFAULT_BAUD = 3_000_000        # the iCEBreaker's FT2232H channel B runs 3 Mbaud reliably

END, ESC, ESC_END, ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD

LOAD_CHUNK = 256                # data bytes per LOAD frame (the board buffers one frame)
MAX_PAYLOAD = 4 + LOAD_CHUNK    # the largest request payload: a LOAD

# request opcodes
OP_INFO = 0x01          # → Info
OP_LOAD = 0x02          # address u32, data[1..LOAD_CHUNK] → address u32, length u16, crc16 of stored bytes
OP_LOAD_DONE = 0x03     # image length u32, crc32 u32 → (empty); the board checks the whole image
OP_RESET_STATE = 0x04   # → (empty); zeroes the recurrent state of every layer
OP_TOKEN = 0x05         # token u16 → next token u16 (argmax), cycles u32, core busy cycles u32
OP_LOGITS = 0x06        # → logits of the last token, V × int16 (LOGIT_FRAC fractional bits)
OP_ERROR = 0x7F         # reply only: error code u8, offending opcode u8
REPLY = 0x80            # reply opcode = request opcode | REPLY


class Error:
    BAD_CRC = 1         # the frame's CRC did not match; nothing was done
    BAD_OPCODE = 2      # unknown opcode
    BAD_LENGTH = 3      # payload length wrong for the opcode (or over MAX_PAYLOAD)
    NO_MODEL = 4        # TOKEN or LOGITS before a successful LOAD_DONE
    BAD_ADDRESS = 5     # LOAD outside the board's memory
    IMAGE_CRC = 6       # LOAD_DONE: the stored image does not have the announced CRC/length
    BAD_TOKEN = 7       # token id outside the loaded model's vocabulary
    MODEL_MISMATCH = 8  # LOAD_DONE: the image's header does not fit this bitstream


ERRORS = {
    Error.BAD_CRC: "the board received a frame with a bad CRC",
    Error.BAD_OPCODE: "the board does not know this command",
    Error.BAD_LENGTH: "the command's payload has the wrong length",
    Error.NO_MODEL: "no model is loaded on the board",
    Error.BAD_ADDRESS: "the load address is outside the board's memory",
    Error.IMAGE_CRC: "the model image on the board does not match its CRC",
    Error.BAD_TOKEN: "the token id is outside the model's vocabulary",
    Error.MODEL_MISMATCH: "the model does not fit this bitstream",
}

# payload layouts (struct formats, little-endian)
LOAD_HEADER_FORMAT = "<I"           # address, then the data bytes
LOAD_REPLY_FORMAT = "<IHH"          # address, length, crc16 of what was stored
LOAD_DONE_FORMAT = "<II"            # image length, crc32 (zlib) of the image
TOKEN_REQUEST_FORMAT = "<H"
ERROR_FORMAT = "<BB"                # error code, offending opcode
TOKEN_REPLY_FORMAT = "<HII"         # next token, cycles for this token, core busy cycles
INFO_FORMAT = "<4sBBIIIIHHHHI"      # see Info
INFO_MAGIC = b"MMFA"                # Info.magic of every mmfree accelerator


@dataclass(frozen=True)
class Info:
    """What a bitstream is: its identity and the sizes a model must fit."""
    magic: bytes            # b"MMFA"
    protocol: int           # PROTOCOL_VERSION
    lanes: int              # ternary core lanes
    config_hash: int        # hash of the build parameters (hardware configuration)
    clock_hz: int           # sequencer clock
    baud: int
    memory_bytes: int       # model image capacity (weights, embeddings, parameters, program)
    max_d: int              # largest hidden size
    max_inter: int          # largest intermediate size
    max_vocab: int
    max_layers: int
    arith_version: int      # mmfree.models.arith.ARITH_VERSION the gateware implements

    def pack(self) -> bytes:
        return struct.pack(INFO_FORMAT, self.magic, self.protocol, self.lanes, self.config_hash,
                           self.clock_hz, self.baud, self.memory_bytes, self.max_d, self.max_inter,
                           self.max_vocab, self.max_layers, self.arith_version)

    @classmethod
    def unpack(cls, payload: bytes) -> "Info":
        if len(payload) != struct.calcsize(INFO_FORMAT):
            raise ValueError(f"INFO reply has {len(payload)} bytes, expected {struct.calcsize(INFO_FORMAT)}")
        return cls(*struct.unpack(INFO_FORMAT, payload))


@dataclass(frozen=True)
class TokenResult:
    next_token: int
    cycles: int             # sequencer cycles this token took
    core_busy_cycles: int   # of which the ternary core was busy


# --------------------------------------------------------------------------- CRC and framing

def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE; ``crc16(b"123456789") == 0x29B1``."""
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc


def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    body = bytes([opcode]) + bytes(payload)
    body += struct.pack("<H", crc16(body))
    out = bytearray([END])
    for b in body:
        if b == END:
            out += bytes([ESC, ESC_END])
        elif b == ESC:
            out += bytes([ESC, ESC_ESC])
        else:
            out.append(b)
    out.append(END)
    return bytes(out)


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes
    status: str             # "ok", "crc" (bad CRC or shorter than 3 bytes) or "overflow"


class FrameDecoder:
    """Byte-at-a-time SLIP decoder, the host-side twin of the board's receiver: ``feed(data)``
    returns the frames completed by ``data``. Bytes outside frames are skipped; a frame longer
    than ``max_body`` is reported as "overflow" (the board answers it with BAD_LENGTH)."""

    def __init__(self, max_body: int = MAX_PAYLOAD + 3):
        self.max_body = max_body
        self._buf = bytearray()
        self._esc = False
        self._overflow = False

    def feed(self, data: bytes) -> list[Frame]:
        frames = []
        for b in data:
            if b == END:
                if self._buf:
                    frames.append(self._finish())
                self._buf.clear()
                self._esc = self._overflow = False
                continue
            if self._esc:
                b = {ESC_END: END, ESC_ESC: ESC}.get(b, b)
                self._esc = False
            elif b == ESC:
                self._esc = True
                continue
            if len(self._buf) >= self.max_body:
                self._overflow = True
            else:
                self._buf.append(b)
        return frames

    def _finish(self) -> Frame:
        body = bytes(self._buf)
        if self._overflow:
            return Frame(body[0], b"", "overflow")
        if len(body) < 3 or crc16(body[:-2]) != struct.unpack("<H", body[-2:])[0]:
            return Frame(body[0], b"", "crc")
        return Frame(body[0], body[1:-2], "ok")
