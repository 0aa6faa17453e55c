"""The sequencer's instruction set, the device image's header and the hardware configuration.

Plain Python (no Amaranth): the single source of truth that the gateware generator (the
sequencer decodes instructions with :func:`instruction_layout`), the image builder
(:mod:`mmfree.firmware.image`), the interpreter and the host library all import.
docs/isa.md explains every instruction, the memory map and the cost model.

Machine model
-------------
* **Weight memory**: ``hw.weight_words`` words of 64 bits (four 16-bit SPRAMs read in
  parallel). The device image is loaded into it byte by byte from address 0 (LOAD frames);
  byte address ``a`` is bits ``8·(a % 8) .. 8·(a % 8) + 7`` of word ``a // 8`` (little-endian).
  It holds the header (words 0..3), the program and every model parameter. Vectors start
  at word boundaries: an int16 vector has element ``k`` in bits ``16·(k % 4)`` of word
  ``addr + k // 4``, an int8 row element ``k`` in byte ``k % 8`` of word ``addr + k // 8``.
* **Scratch memory**: ``hw.scratch_words`` words of int16 (EBR, one read and one write port);
  instructions name vectors in it by their first word address.
* **State memory**: the MLGRU unit's ``h``, ``max_layers × max_d`` int16, zero after a state
  reset. **Activation buffer**: BITLINEAR's int8 activations, internal to the instruction.
* **Registers**: the token being run (from the ``start`` stream) and ``next_token`` (ARGMAX).

An instruction is :data:`INSN_WORDS` (2) weight words, 128 bits, little-endian (word 0 holds
bits 0..63). Bits 0..3 hold the opcode; the operands follow from bit 4 upward in the order in
which each instruction class below declares them, each as wide as the hardware configuration
requires (:func:`instruction_layout`); unused high bits are zero. Signed fields are two's
complement.
"""

from __future__ import annotations

import enum
import functools
import numbers
import struct
import zlib
from dataclasses import dataclass, field, fields
from typing import ClassVar

from .valu import TEMP_VECTORS

__all__ = [
    "ISA_VERSION", "WORD_BITS", "WORD_BYTES", "INSN_BITS", "INSN_WORDS", "OP_BITS",
    "HardwareConfig", "ICEBREAKER", "Op", "FieldSpec", "instruction_layout", "format_layout",
    "Instruction", "Embed", "Norm", "BitLinear", "MLGRU", "GLU", "ResAdd", "ArgMax", "Halt",
    "INSTRUCTION_CLASSES", "encode_program", "decode_program",
    "IMAGE_MAGIC", "HEADER_FORMAT", "HEADER_BYTES", "HEADER_WORDS", "HEADER_FIELDS",
    "ImageHeader", "trit_words", "vector_words", "row_words",
]

ISA_VERSION = 1             # bump when an encoding, the header or the memory map changes

WORD_BITS = 64              # weight memory word
WORD_BYTES = WORD_BITS // 8
INSN_WORDS = 2              # weight words per instruction
INSN_BITS = INSN_WORDS * WORD_BITS
OP_BITS = 4


def _bitlen(v: int) -> int:
    return int(v).bit_length()


# --------------------------------------------------------------------------- hardware configuration

@dataclass(frozen=True)
class HardwareConfig:
    """The build parameters of a bitstream: what a model must fit.

    lanes
        Ternary core lanes (output rows per row group): 8, 16 or 32, so that one column of
        a row group (2 bits per lane) fits one 64-bit weight word.
    max_d, max_inter, max_vocab, max_layers
        Largest hidden size, intermediate size, vocabulary and layer count.
    weight_words
        64-bit words of weight memory (16384 = 128 KiB, the UP5K's four SPRAMs).
    program_words
        Weight words the sequencer's program counter can address from the program's start
        (:data:`INSN_WORDS` per instruction).
    scratch_words
        int16 words of scratch memory (EBR).
    clock_hz, baud
        Sequencer clock and UART rate; at least 4 clock cycles per UART bit.

    ``config_hash`` identifies the configuration (and :data:`ISA_VERSION`): an image records
    the hash it was built for, and a bitstream refuses an image of another one.
    """

    lanes: int = 16
    max_d: int = 128
    max_inter: int = 256
    max_vocab: int = 256
    max_layers: int = 4
    weight_words: int = 16384
    program_words: int = 256
    scratch_words: int = 2048
    clock_hz: int = 24_000_000
    baud: int = 3_000_000

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HardwareConfig.{f.name} must be a positive integer, not {v!r}")
        if self.lanes not in (8, 16, 32):
            raise ValueError(f"HardwareConfig.lanes must be 8, 16 or 32 (a column of a row group, "
                             f"2 bits per lane, must fit one {WORD_BITS}-bit weight word), not {self.lanes}")
        for name in ("max_d", "max_inter", "max_vocab"):
            if getattr(self, name) > 0xFFFF:
                raise ValueError(f"HardwareConfig.{name} must be at most 65535 (a 16-bit header "
                                 f"field), not {getattr(self, name)}")
        if self.max_layers > 255:
            raise ValueError(f"HardwareConfig.max_layers must be at most 255, not {self.max_layers}")
        if self.weight_words > 1 << 29:
            raise ValueError(f"HardwareConfig.weight_words must be at most 2**29 (the image length "
                             f"is a 32-bit byte count), not {self.weight_words}")
        if self.program_scratch_words < 1:
            raise ValueError(f"HardwareConfig.scratch_words = {self.scratch_words} leaves no scratch "
                             f"for programs beside the core's {self.temp_words} words of temporary "
                             f"vectors ({TEMP_VECTORS} x max(max_d, max_inter))")
        if self.program_words < INSN_WORDS:
            raise ValueError(f"HardwareConfig.program_words must hold at least one instruction "
                             f"({INSN_WORDS} words), not {self.program_words}")
        if self.clock_hz < 4 * self.baud:
            raise ValueError(f"HardwareConfig.clock_hz = {self.clock_hz} gives fewer than 4 clock cycles "
                             f"per UART bit at {self.baud} baud; raise the clock or lower the baud rate")
        instruction_layout(self)        # raises if an instruction needs more than INSN_BITS

    @property
    def max_cols(self) -> int:
        """Longest BITLINEAR input (and norm statistics input): ``max(max_d, max_inter)``."""
        return max(self.max_d, self.max_inter)

    @property
    def temp_words(self) -> int:
        """Scratch words at the top of scratch that the core's microcode uses for its temporary
        vectors (``firmware.valu.TEMP_VECTORS`` of ``max_cols`` words); programs keep out."""
        return TEMP_VECTORS * self.max_cols

    @property
    def program_scratch_words(self) -> int:
        """Scratch words a program may use: ``scratch_words - temp_words``."""
        return self.scratch_words - self.temp_words

    def temp_base(self, k: int) -> int:
        """First scratch word of the microcode's temporary vector ``k`` (1..TEMP_VECTORS)."""
        if not 1 <= k <= TEMP_VECTORS:
            raise ValueError(f"temporary vectors are 1..{TEMP_VECTORS}, not {k}")
        return self.program_scratch_words + (k - 1) * self.max_cols

    @property
    def max_rows(self) -> int:
        """Most BITLINEAR output rows: ``max(max_d, 2·max_inter, max_vocab)`` (gate_proj has 2I)."""
        return max(self.max_d, 2 * self.max_inter, self.max_vocab)

    @property
    def weight_bytes(self) -> int:
        return self.weight_words * WORD_BYTES

    @property
    def config_hash(self) -> int:
        """CRC-32 of ``mmfree-hw isa=<ISA_VERSION> <field>=<value> ...`` in field order: stable
        across runs and Python versions."""
        text = " ".join([f"mmfree-hw isa={ISA_VERSION}"] + [f"{f.name}={getattr(self, f.name)}" for f in fields(self)])
        return zlib.crc32(text.encode("ascii"))

    def info(self):
        """The :class:`mmfree.protocol.Info` a bitstream of this configuration reports."""
        from mmfree import protocol
        from mmfree.models import arith
        return protocol.Info(magic=b"MMFA", protocol=protocol.PROTOCOL_VERSION, lanes=self.lanes,
                             config_hash=self.config_hash, clock_hz=self.clock_hz, baud=self.baud,
                             memory_bytes=self.weight_bytes, max_d=self.max_d,
                             max_inter=self.max_inter, max_vocab=self.max_vocab,
                             max_layers=self.max_layers, arith_version=arith.ARITH_VERSION)


# --------------------------------------------------------------------------- memory-map helpers

def vector_words(n: int) -> int:
    """Weight words of an int16 (or uint16) vector of ``n`` elements, padded to a whole word."""
    return -(-n // 4)


def row_words(n: int) -> int:
    """Weight words of an int8 row of ``n`` elements (an embedding row), padded to a whole word."""
    return -(-n // 8)


def trit_words(rows: int, cols: int, lanes: int) -> int:
    """Weight words of a BitLinear's packed trits (``models.boardfile.pack_trits`` layout):
    ``ceil(rows / lanes)`` row groups of ``cols`` columns of ``lanes / 4`` bytes each."""
    groups = -(-rows // lanes)
    return -(-(groups * cols * lanes // 4) // WORD_BYTES)


# --------------------------------------------------------------------------- opcodes and fields

class Op(enum.IntEnum):
    """Opcodes (bits 0..3 of an instruction). 0 is HALT, so zeroed memory stops the sequencer."""
    HALT = 0
    EMBED = 1
    NORM = 2
    BITLINEAR = 3
    MLGRU = 4
    GLU = 5
    RESADD = 6
    ARGMAX = 7


@dataclass(frozen=True)
class FieldSpec:
    """One operand of an instruction: bits ``lsb .. lsb + width - 1``, values ``lo .. hi``
    (two's complement when ``signed``); ``limit`` says what sets the range."""
    name: str
    lsb: int
    width: int
    lo: int
    hi: int
    signed: bool
    limit: str


def _kind(kind, *args):
    return field(metadata={"kind": (kind, *args)})


def _resolve(kind: tuple, hw: HardwareConfig) -> tuple[int, int, str]:
    """(lo, hi, what sets the limit) of an operand kind for ``hw``."""
    k = kind[0]
    if k == "scratch":
        return 0, hw.scratch_words - 1, f"the scratch memory has {hw.scratch_words:,} words"
    if k == "weight":
        return 0, hw.weight_words - 1, f"the weight memory has {hw.weight_words:,} words"
    if k == "len":
        attr = kind[1]
        return 1, getattr(hw, attr), f"{attr} of this hardware configuration"
    if k == "uint":
        return 0, (1 << kind[1]) - 1, f"a {kind[1]}-bit field"
    if k == "range":
        return kind[1], kind[2], kind[3]
    if k == "layer":
        return 0, hw.max_layers - 1, "max_layers of this hardware configuration"
    raise AssertionError(k)


def _width(lo: int, hi: int) -> tuple[int, bool]:
    if lo >= 0:
        return max(_bitlen(hi), 1), False
    return max(_bitlen(hi), _bitlen(-lo - 1)) + 1, True


# --------------------------------------------------------------------------- instructions

@dataclass(frozen=True)
class Instruction:
    """Base of the instruction classes. Operands are the dataclass fields (in encoding order);
    ``comment`` is not encoded (listings and error messages show it)."""

    op: ClassVar[Op]
    comment: str = field(default="", compare=False, repr=False, kw_only=True)

    # ---- operands

    @classmethod
    def operand_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if "kind" in f.metadata)

    def operands(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.operand_names()}

    def _label(self) -> str:
        return f"{self.op.name}" + (f" ({self.comment})" if self.comment else "")

    # ---- memory footprint

    def scratch_vectors(self) -> list[tuple[str, int, int, bool]]:
        """Scratch vectors it touches: (operand, first word, length, written)."""
        return []

    def weight_vectors(self, lanes: int) -> list[tuple[str, int, int]]:
        """Weight memory it reads: (operand, first word, words)."""
        return []

    def validate(self, hw: HardwareConfig) -> None:
        """Every operand in its range and every vector inside its memory; a destination of an
        element-wise instruction either is one of its sources or overlaps none (streams read
        element j before they write it, and writes trail reads). Raises ValueError."""
        for spec in instruction_layout(hw)[self.op]:
            v = getattr(self, spec.name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{self._label()} field {spec.name} must be an integer, not {v!r}")
            if not spec.lo <= v <= spec.hi:
                raise ValueError(f"{self._label()} field {spec.name} = {v:,} is outside "
                                 f"[{spec.lo:,}, {spec.hi:,}] ({spec.limit})")
        vecs = self.scratch_vectors()
        for name, start, n, _ in vecs:
            if start + n > hw.scratch_words:
                raise ValueError(f"{self._label()} {name} vector [{start}, {start + n}) runs past the "
                                 f"scratch memory's {hw.scratch_words:,} words")
        for name, start, n in self.weight_vectors(hw.lanes):
            if start + n > hw.weight_words:
                raise ValueError(f"{self._label()} {name} [{start}, {start + n}) runs past the "
                                 f"weight memory's {hw.weight_words:,} words")
        if self.op != Op.BITLINEAR:     # BITLINEAR reads its whole input before it writes
            for dname, dstart, dn, written in vecs:
                if not written:
                    continue
                for sname, sstart, sn, w in vecs:
                    if w or (sstart == dstart and sn == dn):
                        continue
                    if sstart < dstart + dn and dstart < sstart + sn:
                        raise ValueError(f"{self._label()} {dname} [{dstart}, {dstart + dn}) partly "
                                         f"overlaps {sname} [{sstart}, {sstart + sn}); a destination "
                                         "must be one of the sources or overlap none")

    # ---- encoding

    def encode(self, hw: HardwareConfig | None = None) -> tuple[int, ...]:
        """The :data:`INSN_WORDS` 64-bit words of this instruction (word 0 first)."""
        hw = ICEBREAKER if hw is None else hw
        self.validate(hw)
        bits = int(self.op)
        for spec in instruction_layout(hw)[self.op]:
            bits |= (int(getattr(self, spec.name)) & ((1 << spec.width) - 1)) << spec.lsb
        mask = (1 << WORD_BITS) - 1
        return tuple((bits >> (WORD_BITS * i)) & mask for i in range(INSN_WORDS))

    def to_bytes(self, hw: HardwareConfig | None = None) -> bytes:
        return b"".join(struct.pack("<Q", w) for w in self.encode(hw))

    @staticmethod
    def decode(words, hw: HardwareConfig | None = None) -> "Instruction":
        """The instruction of :data:`INSN_WORDS` words (a sequence of ints, one 128-bit int, or
        16 bytes). Raises ValueError for an unknown opcode, non-zero unused bits or an operand
        out of range."""
        hw = ICEBREAKER if hw is None else hw
        if isinstance(words, (bytes, bytearray, memoryview)):
            if len(words) != INSN_WORDS * WORD_BYTES:
                raise ValueError(f"an instruction is {INSN_WORDS * WORD_BYTES} bytes, not {len(words)}")
            bits = int.from_bytes(bytes(words), "little")
        elif isinstance(words, int):
            bits = words
        else:
            words = list(words)
            if len(words) != INSN_WORDS:
                raise ValueError(f"an instruction is {INSN_WORDS} words, not {len(words)}")
            if not all(0 <= int(w) < 1 << WORD_BITS for w in words):
                raise ValueError(f"instruction words are {WORD_BITS}-bit unsigned integers, not {words}")
            bits = sum(int(w) << (WORD_BITS * i) for i, w in enumerate(words))
        if not 0 <= bits < 1 << INSN_BITS:
            raise ValueError(f"an instruction has {INSN_BITS} bits")
        code = bits & ((1 << OP_BITS) - 1)
        try:
            op = Op(code)
        except ValueError:
            raise ValueError(f"opcode {code} is not an instruction") from None
        layout = instruction_layout(hw)[op]
        end = layout[-1].lsb + layout[-1].width if layout else OP_BITS
        if bits >> end:
            raise ValueError(f"{op.name} instruction has non-zero bits above bit {end - 1}")
        values = {}
        for spec in layout:
            v = (bits >> spec.lsb) & ((1 << spec.width) - 1)
            if spec.signed and v >> (spec.width - 1):
                v -= 1 << spec.width
            values[spec.name] = v
        insn = INSTRUCTION_CLASSES[op](**values)
        insn.validate(hw)
        return insn


@dataclass(frozen=True)
class Halt(Instruction):
    """End of the token: the sequencer reports ``next_token`` and its counters."""
    op: ClassVar[Op] = Op.HALT


@dataclass(frozen=True)
class Embed(Instruction):
    """``dst[j] = arith.embed(table[token][j], scales[token], emb_shift)``, j < n.

    Row ``t`` of the int8 table starts at word ``table_addr + t · row_words(n)``; the uint16
    row scales are a vector at ``scale_addr``. The token comes from the ``start`` stream."""
    op: ClassVar[Op] = Op.EMBED
    dst: int = _kind("scratch")
    n: int = _kind("len", "max_d")
    table_addr: int = _kind("weight")
    scale_addr: int = _kind("weight")
    emb_shift: int = _kind("range", 0, 24, "arith.embed's shift, 0..24")

    def scratch_vectors(self):
        return [("dst", self.dst, self.n, True)]

    def weight_vectors(self, lanes):
        return [("table_addr", self.table_addr, row_words(self.n)), ("scale_addr", self.scale_addr, 1)]


@dataclass(frozen=True)
class Norm(Instruction):
    """RMSNorm: ``dst = arith.rmsnorm(src, w, frac_diff, 0, eps_q)``, i.e.
    ``sat16(rshift_round(src · w · mant, e + frac_diff))`` with ``(mant, e) =
    norm_stats(src, eps_q)``; ``frac_diff = w_frac - out_frac``. Two passes over src."""
    op: ClassVar[Op] = Op.NORM
    dst: int = _kind("scratch")
    src: int = _kind("scratch")
    n: int = _kind("len", "max_d")
    w_addr: int = _kind("weight")
    frac_diff: int = _kind("range", -15, 15, "w_frac - out_frac with both in 0..15")
    eps_q: int = _kind("range", 1, (1 << 32) - 1, "the norm unit's 32-bit eps_q")

    def scratch_vectors(self):
        return [("src", self.src, self.n, False), ("dst", self.dst, self.n, True)]

    def weight_vectors(self, lanes):
        return [("w_addr", self.w_addr, vector_words(self.n))]


@dataclass(frozen=True)
class BitLinear(Instruction):
    """BitLinear: ``(mant, e) = norm_stats(src, eps_q)``, ``(A, mvn, sh) =
    quantize_activations(src, g)``, ``acc = ternary_accumulate(T, A)``, ``dst =
    rescale(acc, *rescale_factor(mvn, sh, mant, e, gamma_mant, scale_exp))``.

    ``src`` has ``cols`` elements, ``dst`` gets ``rows``; ``g`` is an int16 vector at
    ``g_addr``; T is packed at ``trit_addr`` as ``pack_trits(T, lanes)`` (row group ``k``,
    column ``j``: bytes ``(k·cols + j)·lanes/4`` onward, one word per column at 32 lanes)."""
    op: ClassVar[Op] = Op.BITLINEAR
    dst: int = _kind("scratch")
    src: int = _kind("scratch")
    rows: int = _kind("len", "max_rows")
    cols: int = _kind("len", "max_cols")
    g_addr: int = _kind("weight")
    trit_addr: int = _kind("weight")
    eps_q: int = _kind("range", 1, 0xFFFF, "a 16-bit field")
    gamma_mant: int = _kind("range", 1 << 15, (1 << 16) - 1, "a 16-bit mantissa in [2**15, 2**16)")
    scale_exp: int = _kind("range", -128, 127, "the rescale unit's signed 8-bit scale_exp")

    def scratch_vectors(self):
        return [("src", self.src, self.cols, False), ("dst", self.dst, self.rows, True)]

    def weight_vectors(self, lanes):
        return [("g_addr", self.g_addr, vector_words(self.cols)),
                ("trit_addr", self.trit_addr, trit_words(self.rows, self.cols, lanes))]


@dataclass(frozen=True)
class MLGRU(Instruction):
    """MLGRU token mixer on layer ``layer``'s state h (per channel j < n)::

        f  = forget_gate(f_src[j], lb[j] if has_lb else None)
        h' = mlgru_update(h[layer][j], i_src[j], f);  h[layer][j] = h'
        dst[j] = output_gate(gn_src[j], g_frac, h', o_frac)

    ``lb`` is a uint16 Q1.15 vector at ``lb_addr`` (ignored without ``has_lb``)."""
    op: ClassVar[Op] = Op.MLGRU
    dst: int = _kind("scratch")
    i_src: int = _kind("scratch")
    f_src: int = _kind("scratch")
    gn_src: int = _kind("scratch")
    n: int = _kind("len", "max_d")
    layer: int = _kind("layer")
    has_lb: int = _kind("uint", 1)
    lb_addr: int = _kind("weight")
    g_frac: int = _kind("range", 0, 15, "the MLGRU unit's 4-bit g_frac")
    o_frac: int = _kind("range", 0, 15, "the MLGRU unit's 4-bit o_frac")

    def scratch_vectors(self):
        return [("i_src", self.i_src, self.n, False), ("f_src", self.f_src, self.n, False),
                ("gn_src", self.gn_src, self.n, False), ("dst", self.dst, self.n, True)]

    def weight_vectors(self, lanes):
        return [("lb_addr", self.lb_addr, vector_words(self.n))] if self.has_lb else []


@dataclass(frozen=True)
class GLU(Instruction):
    """GLU: ``dst[j] = arith.glu(gate_src[j], up_src[j], u_frac)``, j < n."""
    op: ClassVar[Op] = Op.GLU
    dst: int = _kind("scratch")
    gate_src: int = _kind("scratch")
    up_src: int = _kind("scratch")
    n: int = _kind("len", "max_inter")
    u_frac: int = _kind("range", 0, 15, "the GLU unit's 4-bit u_frac")

    def scratch_vectors(self):
        return [("gate_src", self.gate_src, self.n, False), ("up_src", self.up_src, self.n, False),
                ("dst", self.dst, self.n, True)]


@dataclass(frozen=True)
class ResAdd(Instruction):
    """Residual add: ``dst[j] = arith.residual_add(dst[j], src[j], shift)``, j < n."""
    op: ClassVar[Op] = Op.RESADD
    dst: int = _kind("scratch")
    src: int = _kind("scratch")
    n: int = _kind("len", "max_d")
    shift: int = _kind("range", 0, 15, "a residual format change, 0..15")

    def scratch_vectors(self):
        return [("dst", self.dst, self.n, True), ("src", self.src, self.n, False)]


@dataclass(frozen=True)
class ArgMax(Instruction):
    """``next_token = arith.argmax(src[0:n])`` (the lowest index wins a tie)."""
    op: ClassVar[Op] = Op.ARGMAX
    src: int = _kind("scratch")
    n: int = _kind("len", "max_vocab")

    def scratch_vectors(self):
        return [("src", self.src, self.n, False)]


INSTRUCTION_CLASSES: dict[Op, type[Instruction]] = {
    cls.op: cls for cls in (Halt, Embed, Norm, BitLinear, MLGRU, GLU, ResAdd, ArgMax)}


@functools.lru_cache(maxsize=None)
def instruction_layout(hw: HardwareConfig) -> dict[Op, tuple[FieldSpec, ...]]:
    """Each opcode's operand fields for ``hw``: packed from bit :data:`OP_BITS` upward in
    declaration order, each just wide enough for its range. Raises ValueError when an
    instruction would need more than :data:`INSN_BITS` bits."""
    layout = {}
    for op, cls in INSTRUCTION_CLASSES.items():
        specs, lsb = [], OP_BITS
        for f in fields(cls):
            if "kind" not in f.metadata:
                continue
            lo, hi, limit = _resolve(f.metadata["kind"], hw)
            width, signed = _width(lo, hi)
            specs.append(FieldSpec(f.name, lsb, width, lo, hi, signed, limit))
            lsb += width
        if lsb > INSN_BITS:
            raise ValueError(f"this hardware configuration needs {lsb} bits for {op.name} "
                             f"instructions; they have {INSN_BITS}: reduce the memory sizes or limits")
        layout[op] = tuple(specs)
    return layout


def format_layout(hw: HardwareConfig) -> str:
    """The field layout of every instruction for ``hw`` as a Markdown table (docs/isa.md)."""
    lines = ["| opcode | op | fields (bits, range) | bits used |", "|---|---|---|---|"]
    for op, specs in instruction_layout(hw).items():
        parts = [f"`{s.name}` {s.lsb}..{s.lsb + s.width - 1} ({'s' if s.signed else 'u'}{s.width}, "
                 f"{s.lo}..{s.hi})" for s in specs]
        used = specs[-1].lsb + specs[-1].width if specs else OP_BITS
        lines.append(f"| {int(op)} | {op.name} | {'; '.join(parts) or '—'} | {used} |")
    return "\n".join(lines)


def encode_program(program, hw: HardwareConfig | None = None) -> bytes:
    """The program's bytes as they lie in weight memory."""
    return b"".join(insn.to_bytes(hw) for insn in program)


def decode_program(data: bytes, hw: HardwareConfig | None = None) -> list[Instruction]:
    """Inverse of :func:`encode_program` (``len(data)`` a multiple of the instruction size)."""
    size = INSN_WORDS * WORD_BYTES
    if len(data) % size:
        raise ValueError(f"a program is a whole number of {size}-byte instructions, not {len(data)} bytes")
    return [Instruction.decode(data[k:k + size], hw) for k in range(0, len(data), size)]


# --------------------------------------------------------------------------- image header

IMAGE_MAGIC = b"MMFI"
HEADER_FORMAT = "<4sBBBBHHHHIIHHI"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)
HEADER_WORDS = HEADER_BYTES // WORD_BYTES

#: byte offset and size of each header field, for the gateware (word = offset // 8)
HEADER_FIELDS = {
    "magic": (0, 4), "isa_version": (4, 1), "arith_version": (5, 1), "lanes": (6, 1),
    "n_layers": (7, 1), "vocab": (8, 2), "d": (10, 2), "inter": (12, 2),
    "program_length": (14, 2), "image_length": (16, 4), "config_hash": (20, 4),
    "logits_addr": (24, 2), "program_addr": (26, 2), "reserved": (28, 4),
}


@dataclass(frozen=True)
class ImageHeader:
    """Words 0..3 of a device image (:data:`HEADER_FORMAT`, little-endian).

    ``program_length`` counts instructions, which start at word ``program_addr``;
    ``image_length`` counts bytes; ``logits_addr`` is the scratch address of the logits
    (``vocab`` int16) that the program leaves behind for the LOGITS command;
    ``config_hash`` is :attr:`HardwareConfig.config_hash` of the configuration the image
    (its instruction encoding and memory map) was built for."""
    isa_version: int
    arith_version: int
    lanes: int
    n_layers: int
    vocab: int
    d: int
    inter: int
    program_length: int
    image_length: int
    config_hash: int
    logits_addr: int
    program_addr: int

    def pack(self) -> bytes:
        return struct.pack(HEADER_FORMAT, IMAGE_MAGIC, self.isa_version, self.arith_version,
                           self.lanes, self.n_layers, self.vocab, self.d, self.inter,
                           self.program_length, self.image_length, self.config_hash,
                           self.logits_addr, self.program_addr, 0)

    @classmethod
    def unpack(cls, data: bytes) -> "ImageHeader":
        """Raises ValueError for data that does not start with an image header."""
        if len(data) < HEADER_BYTES:
            raise ValueError(f"a device image starts with a {HEADER_BYTES}-byte header; "
                             f"only {len(data)} bytes are there")
        magic, *values, reserved = struct.unpack_from(HEADER_FORMAT, data)
        if magic != IMAGE_MAGIC:
            raise ValueError(f"not a device image (no {IMAGE_MAGIC!r} magic at address 0)")
        if reserved:
            raise ValueError("the image header's reserved field is not zero")
        return cls(*values)


assert HEADER_BYTES % WORD_BYTES == 0 and set(HEADER_FIELDS) >= {"magic"}

ICEBREAKER = HardwareConfig()
"""The iCEBreaker (iCE40UP5K) build: 16 lanes (32 do not fit the UP5K's logic cells beside the
rest; docs/bitstream.md), four SPRAMs of weight memory, 24 MHz, 3 Mbaud."""
