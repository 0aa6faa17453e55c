"""The device image: what the host writes into the weight memory, from address 0 upward.

``build_image(qm, hw)`` lays out a :class:`~mmfree.models.quantized.QuantizedModel` for a
:class:`~mmfree.firmware.isa.HardwareConfig`, in this order (every region starts at a 64-bit
word boundary and is padded with zero bytes to a whole word)::

    header         words 0..3 (isa.ImageHeader)
    program        INSN_WORDS words per instruction (mmfree.firmware.program)
    <bl>.trits     for every BitLinear in canonical order (layers.<l>.{i,f,g,o,gate,down}_proj,
                   lm_head): exactly models.boardfile.pack_trits(T, lanes)'s bytes; at 32 lanes
                   one word per column of a row group
    embed.q        int8 [V, d], each row padded to a whole word (row t at word + t·ceil(d/8))
    embed.scale    uint16 [V]
    vectors        int16, canonical order: per layer attn_norm.w, {i,f,g,o}_proj.g, g_norm.w,
                   lower_bound (uint16 Q1.15, layers >= 1 when the model uses lower bounds),
                   mlp_norm.w, gate_proj.g, down_proj.g; then final_norm.w, lm_head.g

The sigmoid table is not part of the image: the gateware's ROM is ``arith.sigmoid_lut()`` of
the arithmetic version the header names. The image is deterministic: the same model and
configuration give the same bytes.

``fits(qm, hw)`` / ``check_fits(qm, hw)`` say in one sentence why a model does not fit;
``check_image(data, hw)`` checks an image's header against a configuration, as the device
does on LOAD_DONE.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from mmfree.models import arith
from mmfree.models.boardfile import pack_trits
from mmfree.models.quantized import QuantizedModel

from .isa import (HEADER_WORDS, ICEBREAKER, INSN_WORDS, ISA_VERSION, WORD_BYTES, HardwareConfig,
                  ImageHeader, Instruction, encode_program, row_words, trit_words, vector_words)
from .program import ScratchMap, generate_program, program_length

__all__ = ["ModelDoesNotFit", "ImageError", "Region", "MemoryMap", "DeviceImage", "memory_map",
           "fits", "check_fits", "build_image", "check_image"]


class ModelDoesNotFit(ValueError):
    """A model that this hardware configuration cannot run; the message is one sentence."""


class ImageError(ValueError):
    """Bytes that are not a device image for this hardware configuration."""


@dataclass(frozen=True)
class Region:
    """``words`` weight words from word address ``word``; ``nbytes`` of them are data (the rest
    is padding); ``kind`` is header, program, trits, int8, uint16 or int16."""
    name: str
    word: int
    words: int
    nbytes: int
    kind: str

    @property
    def byte(self) -> int:
        return self.word * WORD_BYTES


@dataclass(frozen=True)
class MemoryMap:
    """The regions of an image in address order."""
    regions: tuple[Region, ...]

    @property
    def words(self) -> int:
        last = self.regions[-1]
        return last.word + last.words

    @property
    def addr(self) -> dict[str, int]:
        """Region name → first word address."""
        return {r.name: r.word for r in self.regions}

    def __getitem__(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def format(self) -> str:
        """A Markdown table: region, kind, words, byte addresses."""
        lines = ["| region | kind | first word | words | bytes |", "|---|---|---|---|---|"]
        lines += [f"| {r.name} | {r.kind} | {r.word:,} | {r.words:,} | {r.byte:#07x}..{r.byte + r.nbytes - 1:#07x} |"
                  for r in self.regions]
        return "\n".join(lines)


def _bitlinear_shapes(qm: QuantizedModel):
    for name, p in qm.bitlinears():
        yield name, p.trits.shape


def _vectors(qm: QuantizedModel):
    """(region name, values, kind) of every int16/uint16 vector, in image order."""
    for l, layer in enumerate(qm.layers):
        pre = f"layers.{l}"
        yield f"{pre}.attn_norm.w", layer.attn_norm.w_q, "int16"
        for proj in ("i_proj", "f_proj", "g_proj", "o_proj"):
            yield f"{pre}.{proj}.g", getattr(layer, proj).g_q, "int16"
        yield f"{pre}.g_norm.w", layer.g_norm.w_q, "int16"
        if layer.lower_bound is not None:
            yield f"{pre}.lower_bound", layer.lower_bound, "uint16"
        yield f"{pre}.mlp_norm.w", layer.mlp_norm.w_q, "int16"
        yield f"{pre}.gate_proj.g", layer.gate_proj.g_q, "int16"
        yield f"{pre}.down_proj.g", layer.down_proj.g_q, "int16"
    yield "final_norm.w", qm.final_norm.w_q, "int16"
    yield "lm_head.g", qm.lm_head.g_q, "int16"


def memory_map(qm: QuantizedModel, hw: HardwareConfig) -> MemoryMap:
    """Where every part of ``qm``'s image lies for ``hw`` (sizes only; nothing is checked)."""
    cfg = qm.cfg
    regions, word = [], 0

    def add(name: str, nbytes: int, kind: str):
        nonlocal word
        words = -(-nbytes // WORD_BYTES)
        regions.append(Region(name, word, words, nbytes, kind))
        word += words

    add("header", HEADER_WORDS * WORD_BYTES, "header")
    add("program", program_length(cfg.n_layers) * INSN_WORDS * WORD_BYTES, "program")
    for name, (rows, cols) in _bitlinear_shapes(qm):
        groups = -(-rows // hw.lanes)
        add(f"{name}.trits", groups * cols * hw.lanes // 4, "trits")
        assert regions[-1].words == trit_words(rows, cols, hw.lanes)
    add("embed.q", cfg.vocab_size * row_words(cfg.d) * WORD_BYTES, "int8")
    add("embed.scale", 2 * cfg.vocab_size, "uint16")
    for name, values, kind in _vectors(qm):
        add(name, 2 * len(values), kind)
        assert regions[-1].words == vector_words(len(values))
    return MemoryMap(tuple(regions))


# --------------------------------------------------------------------------- does it fit?

def fits(qm: QuantizedModel, hw: HardwareConfig = ICEBREAKER) -> str | None:
    """None when ``hw`` can run ``qm``; else one sentence naming the first limit exceeded and
    by how much. Checked in this order: lanes, layers, d, I, V, scratch memory, program
    length, weight memory, then every instruction operand against its field."""
    cfg = qm.cfg
    L, d, inter, V = cfg.n_layers, cfg.d, cfg.intermediate_size, cfg.vocab_size
    if qm.lanes != hw.lanes:
        return (f"the model's trits are packed for {qm.lanes} lanes and this bitstream's ternary "
                f"core has {hw.lanes}; convert the model again with lanes={hw.lanes}")
    for what, have, limit, name in (("layers", L, hw.max_layers, "max_layers"),
                                    ("hidden size d", d, hw.max_d, "max_d"),
                                    ("intermediate size I", inter, hw.max_inter, "max_inter"),
                                    ("vocabulary V", V, hw.max_vocab, "max_vocab")):
        if have > limit:
            return (f"the model's {what} = {have:,} exceeds this bitstream's {name} = {limit:,} "
                    f"by {have - limit:,}")
    need = ScratchMap.for_dims(d, inter, V).words
    if need > hw.program_scratch_words:
        return (f"the model needs {need:,} words of scratch memory; this bitstream leaves programs "
                f"{hw.program_scratch_words:,} of its {hw.scratch_words:,} ({need - hw.program_scratch_words:,} "
                f"words too many)")
    need = program_length(L) * INSN_WORDS
    if need > hw.program_words:
        return (f"the model's program needs {need:,} words; this bitstream's sequencer addresses "
                f"{hw.program_words:,} ({need - hw.program_words:,} words too many)")
    mm = memory_map(qm, hw)
    need, have = mm.words * WORD_BYTES, hw.weight_bytes
    if need > have:
        return (f"the model needs {need:,} bytes of weight memory; this bitstream has {have:,} "
                f"({need - have:,} bytes too many)")
    for insn in generate_program(qm, mm.addr, ScratchMap.for_dims(d, inter, V)):
        try:
            insn.validate(hw)
        except ValueError as exc:
            return str(exc)
    return None


def check_fits(qm: QuantizedModel, hw: HardwareConfig = ICEBREAKER) -> None:
    """Raises :class:`ModelDoesNotFit` with :func:`fits`'s sentence when ``qm`` does not fit."""
    problem = fits(qm, hw)
    if problem is not None:
        raise ModelDoesNotFit(problem)


# --------------------------------------------------------------------------- the image

@dataclass(frozen=True)
class DeviceImage:
    """A built image: ``data`` (the bytes from address 0), the configuration it was built for,
    its header, program, memory map and scratch buffers."""
    data: bytes
    hw: HardwareConfig
    header: ImageHeader
    program: tuple[Instruction, ...]
    memory: MemoryMap
    scratch: ScratchMap
    name: str = "model"

    def __len__(self) -> int:
        return len(self.data)

    @property
    def crc32(self) -> int:
        """zlib CRC-32 of the image (what LOAD_DONE announces)."""
        return zlib.crc32(self.data)

    def listing(self) -> str:
        """The program as assembler text, with the instruction addresses and comments."""
        from .assembler import disassemble
        return disassemble(self)


def _put(buf: bytearray, region: Region, payload: bytes):
    assert len(payload) == region.nbytes, (region.name, len(payload), region.nbytes)
    buf[region.byte:region.byte + len(payload)] = payload


def build_image(qm: QuantizedModel, hw: HardwareConfig = ICEBREAKER) -> DeviceImage:
    """The device image of ``qm`` for ``hw``; raises :class:`ModelDoesNotFit` first if it does
    not fit."""
    check_fits(qm, hw)
    cfg = qm.cfg
    mm = memory_map(qm, hw)
    scratch = ScratchMap.for_dims(cfg.d, cfg.intermediate_size, cfg.vocab_size)
    program = tuple(generate_program(qm, mm.addr, scratch))
    buf = bytearray(mm.words * WORD_BYTES)
    header = ImageHeader(isa_version=ISA_VERSION, arith_version=arith.ARITH_VERSION,
                         lanes=hw.lanes, n_layers=cfg.n_layers, vocab=cfg.vocab_size, d=cfg.d,
                         inter=cfg.intermediate_size, program_length=len(program),
                         image_length=len(buf), config_hash=hw.config_hash,
                         logits_addr=scratch.logits, program_addr=mm["program"].word)
    _put(buf, mm["header"], header.pack())
    _put(buf, mm["program"], encode_program(program, hw))
    for name, p in qm.bitlinears():
        _put(buf, mm[f"{name}.trits"], pack_trits(p.trits, hw.lanes).tobytes())
    rows = np.zeros((cfg.vocab_size, row_words(cfg.d) * WORD_BYTES), dtype=np.int8)
    rows[:, :cfg.d] = qm.emb_q
    _put(buf, mm["embed.q"], rows.tobytes())
    _put(buf, mm["embed.scale"], np.asarray(qm.emb_scale, dtype="<u2").tobytes())
    for name, values, kind in _vectors(qm):
        _put(buf, mm[name], np.asarray(values, dtype="<i2" if kind == "int16" else "<u2").tobytes())
    return DeviceImage(data=bytes(buf), hw=hw, header=header, program=program, memory=mm,
                       scratch=scratch, name=qm.name)


def check_image(data: bytes, hw: HardwareConfig = ICEBREAKER) -> ImageHeader:
    """The header of image ``data`` after the checks a device makes on LOAD_DONE: magic,
    ISA and arithmetic versions, the configuration hash, the length, the model's sizes against
    ``hw``'s limits and the program inside the image. Raises :class:`ImageError`."""
    try:
        h = ImageHeader.unpack(data)
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    if h.isa_version != ISA_VERSION:
        raise ImageError(f"the image is for instruction set version {h.isa_version}; this one "
                         f"implements version {ISA_VERSION}")
    if h.arith_version != arith.ARITH_VERSION:
        raise ImageError(f"the image is for arithmetic version {h.arith_version}; this one "
                         f"implements version {arith.ARITH_VERSION}")
    if h.config_hash != hw.config_hash:
        raise ImageError(f"the image was built for hardware configuration {h.config_hash:#010x}, "
                         f"not for this one ({hw.config_hash:#010x})")
    if h.image_length != len(data):
        raise ImageError(f"the header announces {h.image_length:,} bytes; the image has {len(data):,}")
    if h.image_length > hw.weight_bytes:
        raise ImageError(f"the image has {h.image_length:,} bytes; the weight memory holds {hw.weight_bytes:,}")
    if h.lanes != hw.lanes:
        raise ImageError(f"the image's trits are packed for {h.lanes} lanes; this ternary core has {hw.lanes}")
    for what, have, limit in (("n_layers", h.n_layers, hw.max_layers),
                              ("d", h.d, hw.max_d), ("inter", h.inter, hw.max_inter),
                              ("vocab", h.vocab, hw.max_vocab)):
        if not 1 <= have <= limit:
            raise ImageError(f"the image's {what} = {have} is outside [1, {limit}]")
    end = (h.program_addr + h.program_length * INSN_WORDS) * WORD_BYTES
    if h.program_length < 1 or h.program_addr < HEADER_WORDS or end > len(data) \
            or h.program_length * INSN_WORDS > hw.program_words:
        raise ImageError(f"the image's program ({h.program_length} instructions at word "
                         f"{h.program_addr}) is not inside the image and the program memory")
    if h.logits_addr + h.vocab > hw.scratch_words:
        raise ImageError(f"the image's logits [{h.logits_addr}, {h.logits_addr + h.vocab}) run past "
                         f"the scratch memory's {hw.scratch_words:,} words")
    return h
