"""Request/reply frames to a board over any pyserial URL (``/dev/ttyUSB1``, ``socket://host:port``,
``loop://``), in the framing of :mod:`mmfree.protocol` (docs/protocol.md).

:class:`Link` sends one request frame and waits for its one reply frame. What it does about the
things that go wrong on a serial line:

- a fragment of an earlier, interrupted session in the board's receiver: before the first
  request a lone END (:meth:`Link.sync`) terminates it and its answer is discarded;
- stale input (a reply that arrived after an earlier request gave up) is drained before each
  request, and reply frames to other opcodes are ignored;
- the board's ``BAD_CRC`` answer means it did nothing, so the request is sent again (up to
  ``retries`` times). When it names another opcode (this request's opcode byte was hit, or line
  noise before the request formed a fragment), an idempotent request is sent again at once and
  a non-idempotent one only if its reply has not come by the timeout;
- a reply that arrives corrupted is re-requested when the request is idempotent, else it is
  :class:`CorruptedReply`. Idempotent: every opcode but ``TOKEN`` (a second TOKEN would
  advance the model's state twice) and ``LOAD`` (the board's image check counts every
  accepted LOAD, so a chunk accepted twice makes LOAD_DONE fail; host/board.py restarts the
  upload instead);
- silence until the timeout is :class:`BoardNotResponding`; bytes that never form a valid frame
  (typically a wrong baud rate) are :class:`GarbledReplies`;
- any other error answer raises the :class:`BoardError` subclass of its code, whose message is
  the sentence of ``protocol.ERRORS``.

Every exception here derives from :class:`LinkError` and its message is one sentence.
"""

from __future__ import annotations

import re
import struct
import time

import serial

from mmfree.protocol import (DEFAULT_BAUD, END, ERROR_FORMAT, ERRORS, OP_ERROR, OP_LOAD, OP_TOKEN,
                             REPLY, Error, FrameDecoder, encode_frame)

__all__ = ["Link", "LinkError", "BoardNotResponding", "GarbledReplies", "CorruptedReply", "BoardError",
           "BadCrcError", "BadOpcodeError", "BadLengthError", "NoModelError", "BadAddressError",
           "ImageCrcError", "BadTokenError", "ModelMismatchError", "ERROR_CLASSES", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 2.0           # seconds; a token takes milliseconds on the board
MAX_REPLY_BODY = 3 + 2 * 65536  # opcode + the largest LOGITS payload (max_vocab is u16) + crc16
_POLL_S = 0.02                  # read granularity while waiting: bounds how late a timeout fires


class LinkError(Exception):
    """Anything that went wrong talking to a board; the message is one sentence."""


class BoardNotResponding(LinkError):
    """No reply frame arrived within the timeout."""


class GarbledReplies(LinkError):
    """Bytes arrive but never a valid reply frame: typically the wrong baud rate."""


class CorruptedReply(GarbledReplies):
    """The reply to a request that cannot be repeated safely (TOKEN, LOAD) arrived corrupted:
    the board executed the request, but its answer is unknown."""


NOT_IDEMPOTENT = (OP_TOKEN, OP_LOAD)    # executing these twice is not executing them once


class BoardError(LinkError):
    """The board answered OP_ERROR. ``code`` is a :class:`mmfree.protocol.Error` value,
    ``opcode`` the request it refused; the message is ``protocol.ERRORS[code]``."""
    code: int = 0

    def __init__(self, code: int, opcode: int, message: str | None = None):
        self.code, self.opcode = code, opcode
        super().__init__(message or ERRORS.get(code, f"the board answered with unknown error code {code}"))


class BadCrcError(BoardError):
    code = Error.BAD_CRC


class BadOpcodeError(BoardError):
    code = Error.BAD_OPCODE


class BadLengthError(BoardError):
    code = Error.BAD_LENGTH


class NoModelError(BoardError):
    code = Error.NO_MODEL


class BadAddressError(BoardError):
    code = Error.BAD_ADDRESS


class ImageCrcError(BoardError):
    code = Error.IMAGE_CRC


class BadTokenError(BoardError):
    code = Error.BAD_TOKEN


class ModelMismatchError(BoardError):
    code = Error.MODEL_MISMATCH


ERROR_CLASSES: dict[int, type[BoardError]] = {
    cls.code: cls for cls in (BadCrcError, BadOpcodeError, BadLengthError, NoModelError,
                              BadAddressError, ImageCrcError, BadTokenError, ModelMismatchError)}


def board_error(code: int, opcode: int) -> BoardError:
    """The exception for an OP_ERROR answer ``(code, opcode)``."""
    return ERROR_CLASSES.get(code, BoardError)(code, opcode)


class Link:
    """One serial connection to a board.

    ``url``: anything ``serial.serial_for_url`` opens; ``baud``: the rate the bitstream was
    built for (ignored by socket:// and loop://); ``timeout``: seconds to wait for a reply;
    ``retries``: how often one request is sent again after BAD_CRC or a corrupted reply.
    ``resends`` counts the requests sent again so far (tests and diagnostics read it).
    Opening a port that does not exist raises :class:`LinkError`. The first :meth:`request`
    calls :meth:`sync` unless it was called already.
    """

    def __init__(self, url: str, baud: int = DEFAULT_BAUD, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 3):
        if not timeout > 0:
            raise ValueError(f"the timeout must be positive, not {timeout}")
        if isinstance(baud, bool) or not isinstance(baud, int) or baud < 1:
            raise ValueError(f"the baud rate must be a positive integer, not {baud!r}")
        if retries < 0:
            raise ValueError(f"retries must not be negative, not {retries}")
        self.url, self.baud, self.timeout, self.retries = url, baud, timeout, retries
        self.resends = 0
        self.synced = False
        try:
            self._port = serial.serial_for_url(url, baudrate=baud, timeout=_POLL_S)
        except (serial.SerialException, ValueError, OSError) as exc:
            raise LinkError(f"cannot open {url}: {_reason(exc)}; is the board plugged in and is "
                            "this its port?") from None

    def close(self):
        self._port.close()

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc):
        self.close()

    def sync(self, settle_s: float = 0.05):
        """Terminate any partial frame the board holds from an earlier, interrupted session (a
        lone END: the board answers that fragment with BAD_CRC, or nothing if it held none) and
        discard what comes back within ``settle_s``. Afterwards the board's receiver is empty,
        so a BAD_CRC answer can only be about the host's own frame."""
        self.synced = True
        self._write(bytes([END]))
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            self._read()

    def request(self, opcode: int, payload: bytes = b"", *, idempotent: bool | None = None) -> bytes:
        """Send ``opcode, payload``; return the payload of the board's reply ``opcode | REPLY``.

        ``idempotent`` (default: every opcode but TOKEN and LOAD) allows sending the request
        again when its reply arrives corrupted. Raises the :class:`BoardError` subclass of an
        error answer, :class:`BoardNotResponding`, :class:`CorruptedReply` (a corrupted reply
        to a request that is not idempotent) or :class:`GarbledReplies`.
        """
        if idempotent is None:
            idempotent = opcode not in NOT_IDEMPOTENT
        if not self.synced:
            self.sync()
        frame = encode_frame(opcode, payload)
        attempt = 0
        while True:
            self._drain()
            self._write(frame)
            outcome, value = self._await_reply(opcode, idempotent)
            if outcome == "reply":
                return value
            retry = outcome == "resend" or (outcome == "corrupted" and idempotent)
            if retry and attempt < self.retries:
                attempt += 1
                self.resends += 1
                continue
            if outcome in ("resend", "error"):
                raise value
            if outcome == "silence":
                raise BoardNotResponding(
                    f"no answer from the board at {self.url} within {self.timeout:g} s: is it "
                    f"connected, programmed with an mmfree bitstream, and at {self.baud} baud?")
            if outcome == "corrupted" and not idempotent:
                again = ("load the model again" if opcode == OP_LOAD
                         else "reset the model state and start again")
                raise CorruptedReply(
                    f"the reply to command 0x{opcode:02x} from {self.url} arrived corrupted and the "
                    f"command cannot be repeated safely; {again}")
            raise GarbledReplies(
                f"the replies from {self.url} are garbled at {self.baud} baud; is that the rate "
                "the board's bitstream was built for (set it with --baud)?")

    # ------------------------------------------------------------------ internals

    def _await_reply(self, opcode: int, idempotent: bool):
        """Wait for the frame that answers ``opcode``: ("reply", payload), ("error", BoardError),
        ("resend", BadCrcError): the board did not execute the request, ("corrupted", None),
        ("silence", None) or ("garbled", None).

        A BAD_CRC answer naming another opcode is most likely about this request with its
        opcode byte corrupted, but may also answer a fragment of line noise before it, in which
        case the real reply follows. An idempotent request is sent again at once; TOKEN and LOAD
        wait for their reply and are sent again only if none came by the timeout (then the
        board most likely never received the request intact, so it did not execute it)."""
        decoder = FrameDecoder(max_body=MAX_REPLY_BODY)
        received = valid_frames = 0
        foreign_bad_crc = None
        deadline = time.monotonic() + self.timeout
        while True:
            data = self._read()
            received += len(data)
            for frame in decoder.feed(data):
                if frame.status != "ok":
                    return "corrupted", None
                valid_frames += 1
                if frame.opcode == opcode | REPLY:
                    return "reply", frame.payload
                if frame.opcode == OP_ERROR and len(frame.payload) == struct.calcsize(ERROR_FORMAT):
                    code, offending = struct.unpack(ERROR_FORMAT, frame.payload)
                    if offending == opcode:
                        error = board_error(code, opcode)
                        return ("resend" if code == Error.BAD_CRC else "error"), error
                    if code == Error.BAD_CRC:
                        foreign_bad_crc = board_error(code, opcode)
                        if idempotent:
                            return "resend", foreign_bad_crc
                # anything else answers an earlier request (or is our own echo on loop://)
            if time.monotonic() >= deadline:
                if foreign_bad_crc is not None:
                    return "resend", foreign_bad_crc
                return ("garbled" if received and not valid_frames else "silence"), None

    def _read(self) -> bytes:
        try:
            data = self._port.read(1)
            if data:
                data += self._port.read(self._port.in_waiting)
            return data
        except serial.SerialException as exc:
            raise LinkError(f"the connection to {self.url} failed: {_reason(exc)}") from None

    def _drain(self):
        try:
            self._port.reset_input_buffer()
        except serial.SerialException as exc:
            raise LinkError(f"the connection to {self.url} failed: {_reason(exc)}") from None

    def _write(self, data: bytes):
        try:
            self._port.write(data)
        except serial.SerialException as exc:
            raise LinkError(f"the connection to {self.url} failed: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """The human part of a pyserial/OS error message: "[Errno 2] No such file or directory:
    '/dev/x'" → "no such file or directory"."""
    text = str(exc)
    found = re.findall(r"\[Errno -?\d+\] ([^:\]]+)", text)
    if found:
        text = found[-1]
    elif ": " in text:
        text = text.rsplit(": ", 1)[1]
    text = text.strip().rstrip(".")
    return (text[:1].lower() + text[1:]) if text else type(exc).__name__
