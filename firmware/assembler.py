"""Text form of sequencer programs, for docs and debugging.

One instruction per line: the opcode name, then every operand as ``name=value`` (any order;
integers in Python syntax: ``128``, ``-3``, ``0x1f0``), then an optional ``; comment``, which
becomes the instruction's comment. A leading ``@0004`` (the word address a listing shows) is
ignored, as are blank lines and lines holding only a comment::

    @0004  EMBED      dst=0x000 n=128 table_addr=0x3a44 scale_addr=0x3e44 emb_shift=13  ; embedding
    @0006  NORM       dst=0x080 src=0x000 n=128 w_addr=0x3e84 frac_diff=-1 eps_q=67

``disassemble(program)`` returns such a listing (print it); ``assemble(text)`` reads one back:
``assemble(disassemble(p)) == p``.
"""

from __future__ import annotations

import re
from dataclasses import fields

from .isa import (IMAGE_MAGIC, INSN_WORDS, INSTRUCTION_CLASSES, WORD_BYTES, HardwareConfig,
                  Instruction, Op, decode_program)

__all__ = ["format_instruction", "assemble", "disassemble"]

_ADDRESS_KINDS = ("scratch", "weight")
_NAME_WIDTH = max(len(op.name) for op in Op)


def format_instruction(insn: Instruction, *, comment: bool = True) -> str:
    """``OPCODE name=value ...  ; comment``: addresses in hex, other operands in decimal."""
    parts = [insn.op.name.ljust(_NAME_WIDTH)]
    for f in fields(insn):
        if "kind" not in f.metadata:
            continue
        v = getattr(insn, f.name)
        parts.append(f"{f.name}={v:#05x}" if f.metadata["kind"][0] in _ADDRESS_KINDS else f"{f.name}={v}")
    text = " ".join(parts)
    if comment and insn.comment:
        text = f"{text:<100s} ; {insn.comment}"
    return text.rstrip()


_LINE = re.compile(r"^\s*(?:@[0-9A-Fa-f]+\s+)?(?P<body>[^;]*?)\s*(?:;\s*(?P<comment>.*?))?\s*$")


def assemble(text: str, hw: HardwareConfig | None = None) -> list[Instruction]:
    """Instructions from assembler text; with ``hw`` each is also checked against its fields.
    Raises ValueError naming the line."""
    program = []
    for number, line in enumerate(text.splitlines(), 1):
        m = _LINE.match(line)
        body, comment = m.group("body"), m.group("comment") or ""
        if not body:
            continue
        name, *args = body.split()
        try:
            cls = INSTRUCTION_CLASSES[Op[name.upper()]]
        except KeyError:
            raise ValueError(f"line {number}: {name!r} is not an instruction "
                             f"({', '.join(op.name for op in Op)})") from None
        values = {}
        for arg in args:
            key, eq, value = arg.partition("=")
            if not eq:
                raise ValueError(f"line {number}: operand {arg!r} is not of the form name=value")
            if key not in cls.operand_names():
                raise ValueError(f"line {number}: {cls.op.name} has no operand {key!r} "
                                 f"(it has {', '.join(cls.operand_names()) or 'none'})")
            if key in values:
                raise ValueError(f"line {number}: operand {key!r} is given twice")
            try:
                values[key] = int(value, 0)
            except ValueError:
                raise ValueError(f"line {number}: operand {key}={value!r} is not an integer") from None
        missing = [k for k in cls.operand_names() if k not in values]
        if missing:
            raise ValueError(f"line {number}: {cls.op.name} needs operand {missing[0]!r}")
        insn = cls(**values, comment=comment)
        if hw is not None:
            try:
                insn.validate(hw)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
        program.append(insn)
    return program


def disassemble(program, hw: HardwareConfig | None = None) -> str:
    """A readable listing of ``program``: a :class:`~mmfree.firmware.image.DeviceImage`, the
    bytes of an image (decoded for ``hw``, default the iCEBreaker's), the bytes of encoded
    instructions, or a sequence of :class:`~mmfree.firmware.isa.Instruction`. Image listings
    start with a comment line describing the header and show each instruction's word address."""
    from .image import DeviceImage, check_image

    lines, base = [], None
    if isinstance(program, DeviceImage):
        hw, header, base, insns = program.hw, program.header, program.header.program_addr, program.program
        lines.append(f"; {program.name}: " + _describe(header))
    elif isinstance(program, (bytes, bytearray, memoryview)) and bytes(program[:4]) == IMAGE_MAGIC:
        data = bytes(program)
        header = check_image(data, hw) if hw is not None else check_image(data)
        base = header.program_addr
        start = base * WORD_BYTES
        insns = decode_program(data[start:start + header.program_length * INSN_WORDS * WORD_BYTES], hw)
        lines.append("; " + _describe(header))
    elif isinstance(program, (bytes, bytearray, memoryview)):
        insns = decode_program(bytes(program), hw)
    else:
        insns = list(program)
    for k, insn in enumerate(insns):
        text = format_instruction(insn)
        lines.append(text if base is None else f"@{base + k * INSN_WORDS:04x}  {text}")
    return "\n".join(lines) + "\n"


def _describe(h) -> str:
    return (f"V={h.vocab} d={h.d} L={h.n_layers} I={h.inter} lanes={h.lanes}, "
            f"{h.program_length} instructions at word {h.program_addr}, image {h.image_length:,} bytes, "
            f"logits at scratch {h.logits_addr:#05x}, config {h.config_hash:#010x}")
