"""Instruction-level interpreter of device images, and the sequencer's cost model.

:class:`Interpreter` reads the header and the program from the image bytes alone (no
:class:`~mmfree.models.quantized.QuantizedModel`), models the scratch memory, the MLGRU state
memory and the ``next_token`` register, and executes each instruction with the functions of
:mod:`mmfree.models.arith`, reading parameter vectors and trits from the image as the
sequencer reads them from weight memory. Its logits equal
:class:`~mmfree.models.golden.IntegerModel`'s bit for bit (tests/test_firmware.py), which
proves the instruction set, the image layout and the program generator together.

:class:`CostModel` counts the cycles of each instruction on the accelerator core exactly (one
instruction at a time, as the sub-passes of ``firmware.valu.MICROCODE``); docs/isa.md states
the formulas. Costs depend on the instruction's operands only, so every token of a model costs
the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mmfree.models import arith

from .image import DeviceImage, ImageError, check_image
from .valu import MICROCODE, Reduce
from .isa import (ICEBREAKER, INSN_WORDS, WORD_BYTES, GLU, MLGRU, ArgMax, BitLinear, Embed,
                  HardwareConfig, Halt, Instruction, Norm, ResAdd, decode_program, row_words,
                  trit_words, vector_words)

__all__ = ["CostModel", "InstructionCost", "Interpreter", "ExecutionError", "program_cost"]


class ExecutionError(RuntimeError):
    """An instruction that, while running, reads or writes outside what it may (a malformed
    image; reads of parameters that lie outside the image are found when the image is loaded
    and raise :class:`~mmfree.firmware.image.ImageError` instead)."""


# --------------------------------------------------------------------------- cost model

@dataclass(frozen=True)
class CostModel:
    """Exact cycle counts of the accelerator core (hdl/sequencer.py), which runs one
    instruction at a time as the sub-passes of ``firmware.valu.MICROCODE``.

    Unit latencies are those the units in hdl/ document (tests/test_firmware.py checks them
    against the units): ``valu`` (VALU: element in -> result out), ``stats`` (NormStats: last
    element -> (mant, e)), ``scalars`` (BitLinearScalars' worst case, which the sequencer always
    waits so that costs depend on operands only). The rest is the sequencer's schedule:

    * every instruction: ``fetch`` = 4 cycles (two registered weight-memory reads, decode);
      EMBED 2 more for its row scale;
    * a VALU sub-pass of n elements: 1 (start) + n (one element per cycle; the scratch memory
      has two read ports) + ``operand`` (the register in front of the VALU) + ``valu`` + 2 (the
      results go straight from the VALU into scratch, the state or the activation buffer);
    * a statistics pass (NORM): 1 + n + ``stats`` + 2; ARGMAX: 1 + n + 2;
    * BITLINEAR: its statistics-and-absmax pass and its normalize pass (which needs only
      ``sh`` from max|x·g|) are VALU sub-passes; NormStats and then BitLinearScalars work
      meanwhile, and the act pass starts when their results are there: from the first pass's
      start to the act pass's start ``1 + max(2·(C + operand + valu + 2) + 1, C + stats +
      scalars + 2)`` cycles; then the act pass (a VALU sub-pass);
    * BITLINEAR's core phase: G = ceil(rows / lanes) row groups of ``cols`` columns, one column
      per cycle, started ``max(cols, lanes + 1)`` cycles apart (a group's sums drain through the
      VALU one per cycle while the next accumulates); group 0 starts ``operand + valu + 2``
      cycles into the "act" pass, so the drain sub-pass after it takes
      1 + (G - 1)·max(cols, lanes + 1) + last_rows + ``operand`` + ``valu`` + 2.
    """
    lanes: int
    stats: int
    valu: int = 6
    scalars: int = 112
    operand: int = 1            # the sequencer's operand register in front of the VALU
    fetch: int = 4
    embed_scale: int = 2

    @classmethod
    def for_hw(cls, hw: HardwareConfig) -> "CostModel":
        """The units sized for ``hw``: one NormStats for vectors up to ``max_cols``
        (``ss_width = bitlen(max_cols · 2**30)``, latency ``max(ss_width, 34) + 84``)."""
        ss_width = (hw.max_cols << 30).bit_length()
        return cls(lanes=hw.lanes, stats=max(ss_width, 34) + 84)

    def sub_pass(self, sp, n: int) -> int:
        """Cycles of one sub-pass of ``n`` elements (BITLINEAR's are in :meth:`bitlinear`)."""
        if sp.reduce == Reduce.STATS:
            return 1 + n + self.stats + 2
        if not sp.valu:
            return 1 + n + 2
        return 1 + n + self.operand + self.valu + 2

    def bitlinear(self, rows: int, cols: int) -> int:
        """BITLINEAR without its fetch: the stats_absmax and normalize passes, while NormStats
        and then BitLinearScalars work (the act pass waits for them), the act pass, and the
        core phase with its drain."""
        valu_pass = 1 + cols + self.operand + self.valu + 2
        head = 1 + max(2 * (valu_pass - 1) + 1, cols + self.stats + self.scalars + 2)
        return head + valu_pass + self.core_phase(rows, cols)

    def core_phase(self, rows: int, cols: int) -> int:
        """The drain sub-pass: from its start to its last result, the core having started
        ``operand + valu + 2`` cycles into the "act" pass before it."""
        groups = -(-rows // self.lanes)
        last_rows = rows - (groups - 1) * self.lanes
        return 1 + (groups - 1) * max(cols, self.lanes + 1) + last_rows + self.operand + self.valu + 2

    def cost(self, insn: Instruction) -> tuple[int, int]:
        """``(cycles, core_busy)`` of one instruction: cycles from its fetch to the fetch of the
        next one, and the cycles in which the ternary core takes a column."""
        if isinstance(insn, Halt):
            return self.fetch, 0
        if isinstance(insn, ArgMax):
            return self.fetch + 1 + insn.n + 2, 0
        if isinstance(insn, BitLinear):
            return (self.fetch + self.bitlinear(insn.rows, insn.cols),
                    -(-insn.rows // self.lanes) * insn.cols)
        name = _MICROCODE_NAME.get(type(insn))
        if name is None:
            raise TypeError(f"no cost for {insn!r}")
        cycles = self.fetch + (self.embed_scale if isinstance(insn, Embed) else 0)
        for sp in MICROCODE[name]:
            if sp.cond_lb and not insn.has_lb:
                cycles += 1                              # the skipped sub-pass's start cycle
            else:
                cycles += self.sub_pass(sp, insn.n)
        return cycles, 0


_MICROCODE_NAME = {Embed: "EMBED", Norm: "NORM", BitLinear: "BITLINEAR", MLGRU: "MLGRU",
                   GLU: "GLU", ResAdd: "RESADD"}


class InstructionCost(NamedTuple):
    pc: int
    op: str
    comment: str
    cycles: int
    core_busy: int


def program_cost(program, hw: HardwareConfig = ICEBREAKER) -> list[InstructionCost]:
    """The cost of each instruction of one token (up to the first HALT)."""
    model = CostModel.for_hw(hw)
    out = []
    for pc, insn in enumerate(program):
        cycles, busy = model.cost(insn)
        out.append(InstructionCost(pc, insn.op.name, insn.comment, cycles, busy))
        if isinstance(insn, Halt):
            break
    return out


# --------------------------------------------------------------------------- interpreter

class Interpreter:
    """Runs a device image one token at a time.

    ``Interpreter(image, hw)``: ``image`` is the bytes a host loads (a
    :class:`~mmfree.firmware.image.DeviceImage` is taken as its ``data``); its header is
    checked against ``hw`` as the device checks it (:func:`~mmfree.firmware.image.check_image`,
    raising :class:`~mmfree.firmware.image.ImageError`).

    ``step(token)`` runs the program and returns ``(logits, next_token)``: int16 logits [V]
    (the scratch vector at the header's ``logits_addr``) and the ARGMAX register.
    ``reset_state()`` zeroes every layer's state. After each step, ``last_cycles`` and
    ``last_core_busy`` hold the token's counters (:class:`CostModel`) and ``profile`` the
    cost of each instruction. ``scratch`` (int16) and ``state`` (int16 [max_layers, max_d])
    are the modelled memories.
    """

    def __init__(self, image, hw: HardwareConfig = ICEBREAKER):
        data = bytes(image.data if isinstance(image, DeviceImage) else image)
        self.hw = hw
        self.header = check_image(data, hw)
        self._mem = np.frombuffer(data, dtype=np.uint8)
        start = self.header.program_addr * WORD_BYTES
        end = start + self.header.program_length * INSN_WORDS * WORD_BYTES
        try:
            self.program = tuple(decode_program(data[start:end], hw))
        except ValueError as exc:
            raise ImageError(f"the image's program does not decode: {exc}") from None
        halts = [pc for pc, insn in enumerate(self.program) if isinstance(insn, Halt)]
        if not halts:
            raise ImageError("the image's program has no HALT")
        self.program = self.program[:halts[0] + 1]
        self.lut = arith.sigmoid_lut()          # the gateware's ROM of this arithmetic version
        try:
            self._operands = [self._load_operands(pc, insn) for pc, insn in enumerate(self.program)]
        except ExecutionError as exc:
            raise ImageError(f"the image's program {exc}") from None
        self.profile = program_cost(self.program, hw)
        self.scratch = np.zeros(hw.scratch_words, dtype=np.int16)
        self.state = np.zeros((hw.max_layers, hw.max_d), dtype=np.int16)
        self.next_token = 0
        self.token = None
        self.last_cycles = 0
        self.last_core_busy = 0

    # ------------------------------------------------------------------ weight memory

    def _bytes(self, pc: int, what: str, byte: int, n: int) -> np.ndarray:
        if byte + n > self._mem.size:
            raise ExecutionError(f"instruction {pc} ({self.program[pc].op.name}) reads {what} bytes "
                                 f"[{byte}, {byte + n}) past the image's {self._mem.size:,} bytes")
        return self._mem[byte:byte + n]

    def _vector(self, pc: int, what: str, word: int, n: int, dtype: str) -> np.ndarray:
        """An int16/uint16 vector of ``n`` elements from word ``word`` (4 per word)."""
        raw = self._bytes(pc, what, word * WORD_BYTES, vector_words(n) * WORD_BYTES)
        return raw.view(dtype)[:n].astype(np.int64)

    def _trits(self, pc: int, insn: BitLinear) -> np.ndarray:
        """T [rows, cols] as the ternary core reads it: row group k, column j is the word at
        bytes ``(k·cols + j)·lanes/4`` from ``trit_addr``; lane l is bits 2l+1..2l (00 = 0,
        01 = +1, 11 = -1; the core reads 10 as 0)."""
        lanes, cols = self.hw.lanes, insn.cols
        groups = -(-insn.rows // lanes)
        raw = self._bytes(pc, "trit", insn.trit_addr * WORD_BYTES,
                          trit_words(insn.rows, cols, lanes) * WORD_BYTES)
        raw = raw[:groups * cols * lanes // 4].reshape(groups, cols, lanes // 4)
        codes = np.stack([(raw >> (2 * k)) & 0b11 for k in range(4)], axis=-1)   # [g, cols, lanes/4, 4]
        codes = codes.reshape(groups, cols, lanes).transpose(0, 2, 1).reshape(groups * lanes, cols)
        trits = np.where(codes == 0b01, 1, np.where(codes == 0b11, -1, 0))
        return trits[:insn.rows].astype(np.int64)

    def _load_operands(self, pc: int, insn: Instruction):
        """What an instruction reads from weight memory, read once (the memory is read-only)."""
        if isinstance(insn, Norm):
            return self._vector(pc, "w", insn.w_addr, insn.n, "<i2")
        if isinstance(insn, BitLinear):
            return self._vector(pc, "g", insn.g_addr, insn.cols, "<i2"), self._trits(pc, insn)
        if isinstance(insn, MLGRU) and insn.has_lb:
            return self._vector(pc, "lower bound", insn.lb_addr, insn.n, "<u2")
        return None

    # ------------------------------------------------------------------ scratch memory

    def _read(self, start: int, n: int) -> np.ndarray:
        return self.scratch[start:start + n].astype(np.int64)

    def _write(self, pc: int, start: int, values) -> None:
        values = np.asarray(values)
        if values.size and (values.min() < -32768 or values.max() > 32767):
            raise ExecutionError(f"instruction {pc} ({self.program[pc].op.name}) writes a value "
                                 "outside int16")
        self.scratch[start:start + values.size] = values

    # ------------------------------------------------------------------ execution

    def reset_state(self) -> None:
        """Zero the recurrent state of every layer (RESET_STATE)."""
        self.state[:] = 0

    def step(self, token: int) -> tuple[np.ndarray, int]:
        """Run the program for ``token``: ``(int16 logits [V], next_token)``."""
        V = self.header.vocab
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < V:
            raise ValueError(f"token id {token!r} is outside the vocabulary [0, {V})")
        self.token = int(token)
        for pc, insn in enumerate(self.program):
            self._execute(pc, insn)
        self.last_cycles = sum(c.cycles for c in self.profile)
        self.last_core_busy = sum(c.core_busy for c in self.profile)
        logits = self.scratch[self.header.logits_addr:self.header.logits_addr + V].copy()
        return logits, self.next_token

    def _execute(self, pc: int, insn: Instruction) -> None:
        ops = self._operands[pc]
        lut = self.lut
        if isinstance(insn, Embed):
            stride = row_words(insn.n) * WORD_BYTES
            row = self._bytes(pc, "embedding", insn.table_addr * WORD_BYTES + self.token * stride, insn.n)
            scale = self._bytes(pc, "row scale", insn.scale_addr * WORD_BYTES + 2 * self.token, 2)
            self._write(pc, insn.dst, arith.embed(row.view(np.int8), int(scale.view("<u2")[0]), insn.emb_shift))
        elif isinstance(insn, Norm):
            # rmsnorm depends on w_frac - out_frac only: frac_diff is that difference
            self._write(pc, insn.dst, arith.rmsnorm(self._read(insn.src, insn.n), ops, insn.frac_diff,
                                                    0, insn.eps_q))
        elif isinstance(insn, BitLinear):
            g, trits = ops
            x = self._read(insn.src, insn.cols)
            mant, e = arith.norm_stats(x, insn.eps_q)
            a, mvn, sh = arith.quantize_activations(x, g)
            acc = arith.ternary_accumulate(trits, a)
            s, z = arith.rescale_factor(mvn, sh, mant, e, insn.gamma_mant, insn.scale_exp)
            self._write(pc, insn.dst, arith.rescale(acc, s, z))
        elif isinstance(insn, MLGRU):
            n = insn.n
            f = arith.forget_gate(self._read(insn.f_src, n), ops if insn.has_lb else None, lut)
            h = arith.mlgru_update(self.state[insn.layer, :n].astype(np.int64), self._read(insn.i_src, n), f, lut)
            self.state[insn.layer, :n] = h
            self._write(pc, insn.dst, arith.output_gate(self._read(insn.gn_src, n), insn.g_frac, h,
                                                        insn.o_frac, lut))
        elif isinstance(insn, GLU):
            self._write(pc, insn.dst, arith.glu(self._read(insn.gate_src, insn.n),
                                                self._read(insn.up_src, insn.n), insn.u_frac, lut))
        elif isinstance(insn, ResAdd):
            self._write(pc, insn.dst, arith.residual_add(self._read(insn.dst, insn.n),
                                                         self._read(insn.src, insn.n), insn.shift))
        elif isinstance(insn, ArgMax):
            self.next_token = arith.argmax(self._read(insn.src, insn.n))
        elif isinstance(insn, Halt):
            pass
        else:
            raise ExecutionError(f"instruction {pc}: no semantics for {insn!r}")
