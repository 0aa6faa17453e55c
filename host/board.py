"""The host API of an mmfree accelerator: the same for a board on /dev/ttyUSB1, the simulated
board and the reference model behind socket://127.0.0.1:PORT.

```python
with Board("/dev/ttyUSB1") as board:
    print(board.info())                       # what the bitstream is
    board.load("model.mmf")                   # refuses a model that does not fit, then uploads
    for token in board.generate(list(b"Once upon"), 64, Sampler()):
        print(chr(token), end="")
    print(board.totals.cycles_per_token)
```

The device image comes from ``mmfree.firmware.image.build_image(qm, hw)`` for the hardware
configuration the bitstream reports (:func:`hardware_from_info`). Errors: the board's error
answers and link failures raise :class:`~mmfree.host.link.LinkError` subclasses; a model the
bitstream cannot run raises :class:`ModelDoesNotFit` or :class:`BitstreamMismatch` (both
ValueError) before anything is uploaded. Every message is one sentence.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfree.firmware import isa
from mmfree.firmware.image import ModelDoesNotFit, build_image, check_fits
from mmfree.firmware.isa import HardwareConfig
from mmfree.host.link import (DEFAULT_TIMEOUT, BoardNotResponding, GarbledReplies, ImageCrcError,
                              Link, LinkError)
from mmfree.models import arith
from mmfree.models.quantized import QuantizedModel
from mmfree.models.sampling import Sampler, generate_tokens
from mmfree.protocol import (DEFAULT_BAUD, INFO_FORMAT, INFO_MAGIC, LOAD_CHUNK, LOAD_DONE_FORMAT,
                             LOAD_HEADER_FORMAT, LOAD_REPLY_FORMAT, OP_INFO, OP_LOAD, OP_LOAD_DONE,
                             OP_LOGITS, OP_RESET_STATE, OP_TOKEN, PROTOCOL_VERSION,
                             TOKEN_REPLY_FORMAT, TOKEN_REQUEST_FORMAT, Info, TokenResult, crc16)

__all__ = ["Board", "Counters", "BitstreamMismatch", "MalformedReply", "LoadFailed", "ModelDoesNotFit",
           "HardwareConfig", "hardware_from_info", "build_image", "check_fits", "LOAD_ATTEMPTS"]

LOAD_ATTEMPTS = 3               # uploads of one image (from address 0) before Board.load gives up


class BitstreamMismatch(ValueError):
    """The bitstream and this mmfree (or this model) disagree about something that must match:
    protocol, arithmetic version, lanes, hardware configuration."""


class MalformedReply(LinkError):
    """A reply frame with a valid CRC but the wrong payload length for its opcode."""


class LoadFailed(LinkError):
    """The board did not take the model image in LOAD_ATTEMPTS uploads."""


def hardware_from_info(info: Info) -> HardwareConfig:
    """The ``HardwareConfig`` the bitstream was built with, from its INFO: a preset of
    mmfree.firmware.isa (ICEBREAKER) that reports this INFO, else INFO's fields under their
    HardwareConfig names (``weight_words = memory_bytes / 8``) with the fields INFO does not
    carry (program_words, scratch_words) at their defaults. Its config hash must equal the one
    the bitstream reports, else :class:`BitstreamMismatch`: this mmfree would build images for
    other hardware."""
    candidates = [hw for hw in vars(isa).values() if isinstance(hw, HardwareConfig) and hw.info() == info]
    try:
        candidates.append(HardwareConfig(
            lanes=info.lanes, max_d=info.max_d, max_inter=info.max_inter, max_vocab=info.max_vocab,
            max_layers=info.max_layers, weight_words=info.memory_bytes // isa.WORD_BYTES,
            clock_hz=info.clock_hz, baud=info.baud))
    except ValueError:
        pass
    for hw in candidates:
        if hw.config_hash == info.config_hash:
            return hw
    raise BitstreamMismatch(
        f"the bitstream's hardware configuration (hash 0x{info.config_hash:08x}) is not one this "
        "mmfree can build images for; build the bitstream with this version of mmfree")


@dataclass
class Counters:
    """Token statistics: ``seconds`` is the wall time of the TOKEN and LOGITS requests (link
    round trips + device time); cycles come from the device's counters."""
    tokens: int = 0
    cycles: int = 0
    core_busy_cycles: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cycles_per_token(self) -> float:
        return self.cycles / self.tokens if self.tokens else 0.0

    @property
    def core_utilization(self) -> float:
        """Fraction of the cycles the ternary core was busy."""
        return self.core_busy_cycles / self.cycles if self.cycles else 0.0

    def projected_tokens_per_second(self, clock_hz: int) -> float:
        """Tokens/s of the device alone at ``clock_hz``, without link time."""
        return clock_hz / self.cycles_per_token if self.cycles else 0.0


class Board:
    """An mmfree accelerator behind a serial link (see :class:`~mmfree.host.link.Link` for
    ``url``, ``baud``, ``timeout``, ``retries``). Opening sends a lone END so that the board
    drops any half-received frame of an earlier session.

    Attributes: ``model`` (the QuantizedModel this object loaded, or None), ``last`` (the
    TokenResult of the last TOKEN), ``totals`` (:class:`Counters` since opening or
    :meth:`reset_counters`), ``load_restarts`` (uploads started again from address 0 since
    opening, see :meth:`load`).
    """

    def __init__(self, url: str, baud: int = DEFAULT_BAUD, timeout: float = DEFAULT_TIMEOUT, *,
                 retries: int = 3):
        self.link = Link(url, baud, timeout, retries)
        self.url = url
        self.model: QuantizedModel | None = None
        self.last: TokenResult | None = None
        self.totals = Counters()
        self.load_restarts = 0
        self._info: Info | None = None
        try:
            self.link.sync()
        except BaseException:
            self.link.close()
            raise

    def close(self):
        self.link.close()

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ identity and loading

    def info(self) -> Info:
        """The bitstream's INFO (asked once, then cached); refuses a device that is not an mmfree
        accelerator or speaks another protocol version."""
        if self._info is None:
            reply = self.link.request(OP_INFO)
            try:
                info = Info.unpack(reply)
            except ValueError:
                raise MalformedReply(f"the INFO reply from {self.url} has {len(reply)} bytes, not the "
                                     f"{struct.calcsize(INFO_FORMAT)} of protocol version "
                                     f"{PROTOCOL_VERSION}") from None
            if info.magic != INFO_MAGIC:
                raise BitstreamMismatch(f"the device at {self.url} is not an mmfree accelerator "
                                        f"(its INFO starts with {info.magic!r}, not {INFO_MAGIC!r})")
            if info.protocol != PROTOCOL_VERSION:
                raise BitstreamMismatch(f"the bitstream at {self.url} speaks link protocol version "
                                        f"{info.protocol}, this mmfree speaks version {PROTOCOL_VERSION}; "
                                        "build the bitstream with this version of mmfree")
            self._info = info
        return self._info

    def load(self, model: QuantizedModel | str | Path, progress: bool = True):
        """Upload ``model`` (a QuantizedModel or a board model file) and make it the board's model,
        with a zero state.

        Before sending anything: checks the bitstream's arithmetic version and lanes against the
        model, ``check_fits`` for the bitstream's hardware configuration, and the image size
        against the board's memory. Then LOAD frames of ``LOAD_CHUNK`` bytes in ascending
        addresses from 0 (a tqdm bar on a terminal when ``progress``), each reply's address,
        length and CRC-16 compared with what was sent, and LOAD_DONE with the length and CRC-32
        of the whole image.

        The board's image check covers the data of every LOAD it accepted since the last LOAD
        to address 0, in arrival order, so a chunk must be accepted exactly once. Only chunks
        the board refused (BAD_CRC) are sent again, by the Link. The upload starts again from
        address 0 (``load_restarts`` counts it; the progress bar starts over) when a LOAD reply
        reports other bytes than were sent, arrives corrupted or does not come (the chunk may
        have been accepted), or LOAD_DONE answers IMAGE_CRC. After :data:`LOAD_ATTEMPTS`
        uploads it raises :class:`LoadFailed`. Any other error answer is raised as it is.
        """
        if not isinstance(model, QuantizedModel):
            from mmfree.models.boardfile import read_board_model
            model = read_board_model(model)
        info = self.info()
        if info.arith_version != arith.ARITH_VERSION:
            raise BitstreamMismatch(f"the bitstream implements arithmetic version {info.arith_version}, "
                                    f"this mmfree's models use version {arith.ARITH_VERSION}; build the "
                                    "bitstream with this version of mmfree")
        if model.lanes != info.lanes:
            raise BitstreamMismatch(f"the model's ternary weights are packed for {model.lanes} lanes, "
                                    f"the bitstream's core has {info.lanes}; convert the checkpoint "
                                    f"again with --lanes {info.lanes}")
        hw = hardware_from_info(info)
        check_fits(model, hw)
        image = bytes(build_image(model, hw).data)
        if len(image) > info.memory_bytes:
            raise ModelDoesNotFit(f"the model's device image has {len(image)} bytes, the board's "
                                  f"memory holds {info.memory_bytes}")
        self.model = None
        from tqdm import tqdm
        with tqdm(total=len(image), desc="load", unit="B", unit_scale=True, unit_divisor=1024,
                  leave=False, disable=None if progress else True) as bar:
            for attempt in range(1, LOAD_ATTEMPTS + 1):
                if attempt > 1:
                    self.load_restarts += 1
                    self.link.sync()            # drop a late reply of the failed upload
                    bar.reset()
                    bar.set_description(f"load (attempt {attempt}/{LOAD_ATTEMPTS})")
                failure = self._upload(image, bar)
                if failure is None:
                    break
            else:
                raise LoadFailed(f"the board at {self.url} did not take the model image in "
                                 f"{LOAD_ATTEMPTS} attempts (the last time {failure}); its memory "
                                 "or link is faulty")
        self.reset()            # LOAD_DONE leaves the recurrent state as it was
        self.model = model

    def _upload(self, image: bytes, bar) -> str | None:
        """One upload of ``image`` from address 0, then LOAD_DONE: None if the board took it,
        else why the upload must start again (a phrase)."""
        for address in range(0, len(image), LOAD_CHUNK):
            chunk = image[address:address + LOAD_CHUNK]
            try:
                reply = self.link.request(OP_LOAD, struct.pack(LOAD_HEADER_FORMAT, address) + chunk)
            except BoardNotResponding:
                return f"no reply to the LOAD at address {address} came"
            except GarbledReplies:
                return f"the reply to the LOAD at address {address} arrived corrupted"
            self._expect(OP_LOAD, reply, struct.calcsize(LOAD_REPLY_FORMAT))
            if struct.unpack(LOAD_REPLY_FORMAT, reply) != (address, len(chunk), crc16(chunk)):
                return f"the board reported other bytes than were sent at address {address}"
            bar.update(len(chunk))
        try:
            reply = self.link.request(OP_LOAD_DONE, struct.pack(LOAD_DONE_FORMAT, len(image),
                                                                zlib.crc32(image)))
        except ImageCrcError:
            return "the image on the board did not match its CRC-32"
        self._expect(OP_LOAD_DONE, reply, 0)
        return None

    # ------------------------------------------------------------------ running

    def reset(self):
        """Zero the recurrent state of every layer (the model stays loaded)."""
        self._expect(OP_RESET_STATE, self.link.request(OP_RESET_STATE), 0)

    def step(self, token: int) -> TokenResult:
        """Run one token; the board's argmax next token and cycle counters."""
        t0 = time.perf_counter()
        reply = self.link.request(OP_TOKEN, struct.pack(TOKEN_REQUEST_FORMAT, token))
        self.totals.seconds += time.perf_counter() - t0
        self._expect(OP_TOKEN, reply, struct.calcsize(TOKEN_REPLY_FORMAT))
        self.last = TokenResult(*struct.unpack(TOKEN_REPLY_FORMAT, reply))
        self.totals.tokens += 1
        self.totals.cycles += self.last.cycles
        self.totals.core_busy_cycles += self.last.core_busy_cycles
        return self.last

    def logits(self) -> np.ndarray:
        """The last token's logits: int16 [V] with ``arith.LOGIT_FRAC`` fractional bits."""
        t0 = time.perf_counter()
        reply = self.link.request(OP_LOGITS)
        self.totals.seconds += time.perf_counter() - t0
        if self.model is not None:
            self._expect(OP_LOGITS, reply, 2 * self.model.cfg.vocab_size)
        elif len(reply) % 2:
            self._expect(OP_LOGITS, reply, len(reply) + 1)
        return np.frombuffer(reply, dtype="<i2").astype(np.int16)

    def generate(self, prompt_tokens: Iterable[int], max_tokens: int,
                 sampler: Sampler | None = None) -> Iterator[int]:
        """From a zero state, feed ``prompt_tokens`` and yield ``max_tokens`` tokens, each fed
        back in: the loop of ``mmfree.models.sampling.generate_tokens``, so the text equals the
        golden model's (``mmfree generate``) for the same sampler. Greedy (the default) uses
        the board's argmax; temperature sampling reads the logits (LOGITS) after every token.
        The prompt is checked and the state reset when this is called, not at the first token."""
        sampler = sampler or Sampler()
        prompt = list(prompt_tokens)
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        self.reset()

        def step(token: int) -> np.ndarray:
            result = self.step(token)
            if sampler.greedy:              # the board's argmax as a one-hot "logit" vector
                onehot = np.zeros(result.next_token + 1)
                onehot[-1] = 1.0
                return onehot
            return self.logits().astype(np.float64) / (1 << arith.LOGIT_FRAC)

        return generate_tokens(step, prompt, max_tokens, sampler)

    def reset_counters(self):
        self.totals = Counters()

    def _expect(self, opcode: int, reply: bytes, length: int):
        if len(reply) != length:
            raise MalformedReply(f"the reply to command 0x{opcode:02x} from {self.url} has "
                                 f"{len(reply)} payload bytes, expected {length}")
