"""The accelerator core (v2): weight and scratch memories, the element ALU, the norm statistics,
the BitLinear scalars, the ternary core and the sequencer that runs the device image's program
on them, behind the ports the host link drives."""

from __future__ import annotations

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.firmware.isa import (HEADER_BYTES, HEADER_FIELDS, IMAGE_MAGIC, ISA_VERSION,
                                 HardwareConfig)
from mmfree.models.arith import ARITH_VERSION

from .memory import ScratchMemory, WeightMemory
from .sequencer import CoreUnits, DoneBeat, Sequencer, StartBeat

__all__ = ["AcceleratorCore", "LoadBeat", "StartBeat", "DoneBeat", "core_members",
           "expected_header_bytes"]


class LoadBeat(data.StructLayout):
    """One image byte: ``addr`` (byte address, ``range(memory_bytes)``) and ``data``."""

    def __init__(self, memory_bytes: int):
        super().__init__({"addr": range(memory_bytes), "data": 8})


def core_members(hw: HardwareConfig) -> dict:
    """The ports of :class:`AcceleratorCore` (seen from the core)."""
    return {
        "load": In(stream.Signature(LoadBeat(hw.weight_bytes))),
        "start": In(stream.Signature(StartBeat())),
        "done": Out(stream.Signature(DoneBeat())),
        "reset_state": In(1),
        "ready_state": Out(1),
        "logit_addr": In(range(hw.max_vocab)),
        "logit_data": Out(signed(16)),
        "model_ok": In(1),
        "vocab_size": Out(16),
        "header_ok": Out(1, init=1),     # init as the link's port; driven from reset on
    }


def expected_header_bytes(hw: HardwareConfig) -> dict[int, int]:
    """Header byte address → the value an image for ``hw`` must have there: the magic, both
    versions, the lanes, the configuration hash and the reserved zeros."""
    fixed = {"magic": IMAGE_MAGIC, "isa_version": bytes([ISA_VERSION]),
             "arith_version": bytes([ARITH_VERSION]), "lanes": bytes([hw.lanes]),
             "config_hash": hw.config_hash.to_bytes(4, "little"), "reserved": bytes(4)}
    out = {}
    for name, value in fixed.items():
        offset, size = HEADER_FIELDS[name]
        assert len(value) == size
        out.update({offset + i: value[i] for i in range(size)})
    return out


class AcceleratorCore(wiring.Component):
    """The accelerator core for a :class:`~mmfree.firmware.isa.HardwareConfig`.

    Parameters
    ----------
    hw : HardwareConfig
        Lanes, limits and memory sizes (``firmware.isa``); the units are built for them.
    spram : bool
        The weight memory as four iCE40 SB_SPRAM256KA (for a bitstream) or as an Amaranth
        memory (simulation); see :class:`~mmfree.hdl.memory.WeightMemory`.

    Ports (the host link's contract; directions seen from the core)
    -----
    load : In(stream of LoadBeat)
        One image byte per transfer into the weight memory at its byte address (the image is
        loaded from address 0 upward). ``ready`` is high while no token runs.
    start : In(stream of {token})
        Run one token; taken while idle and ``model_ok``. The link checks ``token <
        vocab_size``.
    done : Out(stream of {next_token, cycles, busy})
        When the token's program has halted: ARGMAX's result, the token's cycles (from its
        first instruction fetch to the end of HALT) and the cycles in which the ternary core
        took a column. Held until taken.
    reset_state : In(1), ready_state : Out(1)
        A one-cycle strobe zeroes every layer's recurrent state; ``ready_state`` is low from
        the cycle after the strobe until that is done (about ``max_layers · max_d`` cycles;
        also after reset).
    logit_addr : In(range(max_vocab)), logit_data : Out(signed(16))
        ``logit_data`` is logit ``logit_addr`` of the last token (scratch word
        ``logits_addr + logit_addr`` of the header), a registered read: the value for the
        address of the previous cycle. Valid while no token runs.
    model_ok : In(1)
        Set by the link after a good LOAD_DONE; tokens start only while it is high.
    vocab_size : Out(16)
        The header's vocabulary size V (bytes 8, 9 of the image), registered as those bytes
        are loaded.
    header_ok : Out(1, init=1)
        (``init`` as the link's port, which a core without the check leaves at 1.) The loaded
        header's fixed bytes are those of an image for ``hw`` (magic, ISA and
        arithmetic versions, lanes, configuration hash, reserved zeros) and its layer count is
        1..max_layers; low from reset until such a header is loaded. (The link refuses
        LOAD_DONE without it; sizes beyond the limits cannot come with a matching
        configuration hash from ``firmware.image.build_image``.)

    Structure
    ---------
    :class:`~mmfree.hdl.memory.WeightMemory` (64-bit words; the sequencer reads, ``load``
    writes), :class:`~mmfree.hdl.memory.ScratchMemory` (int16, two read ports; the sequencer
    reads and writes, ``logit_addr`` reads port X while idle),
    :class:`~mmfree.hdl.sequencer.CoreUnits` (the element ALU
    :class:`~mmfree.hdl.valu.VALU`, NormStats, BitLinearScalars, a serial-output TernaryCore)
    and the :class:`~mmfree.hdl.sequencer.Sequencer`, which runs every macro-op as the
    sub-passes of ``firmware.valu.MICROCODE`` (cycles: ``firmware.interpreter.CostModel``,
    exactly).
    """

    def __init__(self, hw: HardwareConfig, *, spram: bool = False):
        if not isinstance(hw, HardwareConfig):
            raise ValueError(f"AcceleratorCore needs a firmware.isa.HardwareConfig (for example "
                             f"firmware.isa.ICEBREAKER), not {hw!r}")
        self.hw = hw
        self.spram = bool(spram)
        self.memory_bytes = hw.weight_bytes
        self.max_vocab = hw.max_vocab
        self.units = CoreUnits(hw)
        self.seq = Sequencer(hw, self.units)
        self.wmem = WeightMemory(hw, spram=spram)
        self.smem = ScratchMemory(hw)
        super().__init__(core_members(hw))

    def elaborate(self, platform):
        m = Module()
        hw = self.hw
        seq, wmem, smem = self.seq, self.wmem, self.smem
        m.submodules.seq = seq
        m.submodules.wmem = wmem
        m.submodules.smem = smem
        for name, unit in self.units.items():
            m.submodules[name] = unit
            wiring.connect(m, getattr(seq, name), unit)

        # ---- control
        m.d.comb += [
            seq.model_ok.eq(self.model_ok),
            seq.reset_state.eq(self.reset_state),
            self.ready_state.eq(seq.ready_state),
        ]
        wiring.connect(m, wiring.flipped(self.start), seq.start)
        wiring.connect(m, seq.done, wiring.flipped(self.done))

        # ---- weight memory: the sequencer reads it, the load port writes it while idle
        load = self.load
        m.d.comb += [
            load.ready.eq(~seq.running),
            wmem.rd_addr.eq(seq.w_addr),
            seq.w_data.eq(wmem.rd_data),
            wmem.wr_en.eq(load.valid & load.ready),
            wmem.wr_addr.eq(load.p.addr),
            wmem.wr_data.eq(load.p.data),
        ]

        # ---- header fields, taken from the load stream as the bytes go by
        vocab = Signal(16)
        program_length = Signal(16)
        logits_addr = Signal(16)
        program_addr = Signal(16)
        header_bad = Signal(init=1)
        m.d.comb += [self.vocab_size.eq(vocab), self.header_ok.eq(~header_bad),
                     seq.program_addr.eq(program_addr), seq.program_length.eq(program_length)]
        fixed = expected_header_bytes(hw)
        captured = {"vocab": vocab, "program_length": program_length,
                    "logits_addr": logits_addr, "program_addr": program_addr}
        layers_at = HEADER_FIELDS["n_layers"][0]
        with m.If(load.valid & load.ready & (load.p.addr < HEADER_BYTES)):
            mismatch = Signal()
            with m.Switch(load.p.addr[:(HEADER_BYTES - 1).bit_length()]):
                for addr, value in fixed.items():
                    with m.Case(addr):
                        m.d.comb += mismatch.eq(load.p.data != value)
                with m.Case(layers_at):
                    m.d.comb += mismatch.eq((load.p.data == 0) | (load.p.data > hw.max_layers))
                for name, reg in captured.items():
                    offset, size = HEADER_FIELDS[name]
                    for i in range(size):
                        with m.Case(offset + i):
                            m.d.sync += reg[8 * i:8 * i + 8].eq(load.p.data)
            # a load at address 0 starts a new image: its header is checked afresh
            m.d.sync += header_bad.eq(Mux(load.p.addr == 0, mismatch, header_bad | mismatch))

        # ---- scratch memory: the sequencer's while it runs, else port X serves the logit reads
        m.d.comb += [
            smem.x_addr.eq(Mux(seq.running, seq.x_addr, logits_addr + self.logit_addr)),
            smem.y_addr.eq(seq.y_addr),
            seq.x_data.eq(smem.x_data),
            seq.y_data.eq(smem.y_data),
            self.logit_data.eq(smem.x_data),
            smem.wr_en.eq(seq.s_wr_en),
            smem.wr_addr.eq(seq.s_wr_addr),
            smem.wr_data.eq(seq.s_wr_data),
        ]
        return m
