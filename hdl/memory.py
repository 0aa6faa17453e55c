"""The accelerator's memories: the 64-bit weight memory (simulation model or four iCE40
SPRAMs) and the int16 scratch memory (EBR)."""

from __future__ import annotations

from amaranth import Cat, ClockSignal, Const, Instance, Module, Signal, signed
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from mmfree.firmware.isa import WORD_BITS, WORD_BYTES, HardwareConfig

__all__ = ["WeightMemory", "ScratchMemory", "SPRAM_WORDS", "SPRAM_COUNT"]

SPRAM_WORDS = 16384         # SB_SPRAM256KA: 16K x 16 bits
SPRAM_BITS = 16
SPRAM_COUNT = WORD_BITS // SPRAM_BITS      # four side by side make one 64-bit word


class WeightMemory(wiring.Component):
    """The weight memory: ``hw.weight_words`` words of 64 bits, one access per cycle.

    Parameters
    ----------
    hw : HardwareConfig
        ``weight_words`` sets the depth.
    spram : bool
        False: an ``amaranth.lib.memory.Memory`` (simulators, Verilator, Icarus). True: four
        iCE40 ``SB_SPRAM256KA`` side by side (16 bits each, bits ``16·i ..`` of a word in SPRAM
        i), which needs ``weight_words == 16384``; byte writes use the SPRAMs' nibble write
        masks. Both have the same ports and timing.

    Ports
    -----
    rd_addr : In(range(weight_words))
        Word address of a read.
    rd_data : Out(64)
        The word at the ``rd_addr`` of the previous cycle (a registered read, 1 cycle latency).
        Element ``k`` of a little-endian vector is bits ``w·k ..`` of it. After a write cycle
        ``rd_data`` is undefined for one cycle (a single-port SPRAM does not read while it
        writes).
    wr_en, wr_addr : In(1), In(range(8 · weight_words))
        Write byte ``wr_data`` at byte address ``wr_addr``: bits ``8·(a % 8) ..`` of word
        ``a // 8`` (the device image's byte order). The byte is written at the end of the cycle.
    wr_data : In(8)

    Nothing is written but the addressed byte; there is no reset of the contents (the SPRAMs
    power up undefined, the simulation model zeroed).
    """

    def __init__(self, hw: HardwareConfig, spram: bool = False):
        if not isinstance(hw, HardwareConfig):
            raise ValueError(f"WeightMemory needs a firmware.isa.HardwareConfig, not {hw!r}")
        if spram and hw.weight_words != SPRAM_WORDS:
            raise ValueError(f"the SPRAM weight memory has {SPRAM_WORDS} words (four 16K x 16 "
                             f"SB_SPRAM256KA); build the hardware configuration with "
                             f"weight_words={SPRAM_WORDS}, not {hw.weight_words}")
        self.hw = hw
        self.spram = bool(spram)
        self.words = hw.weight_words
        super().__init__({
            "rd_addr": In(range(self.words)),
            "rd_data": Out(WORD_BITS),
            "wr_en": In(1),
            "wr_addr": In(range(self.words * WORD_BYTES)),
            "wr_data": In(8),
        })

    def elaborate(self, platform):
        m = Module()
        lane_bits = (WORD_BYTES - 1).bit_length()
        word = self.wr_addr[lane_bits:]
        lane = self.wr_addr[:lane_bits]
        if not self.spram:
            m.submodules.mem = mem = memory.Memory(shape=WORD_BITS, depth=self.words, init=[])
            rd = mem.read_port()
            wr = mem.write_port(granularity=8)
            m.d.comb += [
                rd.addr.eq(self.rd_addr),
                self.rd_data.eq(rd.data),
                wr.addr.eq(word),
                wr.data.eq(self.wr_data.replicate(WORD_BYTES)),
                wr.en.eq(_byte_enables(self.wr_en, lane)),
            ]
            return m

        # Four single-port SPRAMs share one address: the write's word while writing, else the
        # read address. Byte b of a word is the low (b even) or high byte of SPRAM b // 2.
        addr = Signal(range(SPRAM_WORDS))
        m.d.comb += addr.eq(self.rd_addr)
        with m.If(self.wr_en):
            m.d.comb += addr.eq(word)
        for i in range(SPRAM_COUNT):
            data_out = Signal(SPRAM_BITS, name=f"spram{i}_out")
            mask = Signal(4, name=f"spram{i}_mask")
            m.d.comb += mask.eq(Cat(~lane[0], ~lane[0], lane[0], lane[0]))
            m.submodules[f"spram{i}"] = Instance(
                "SB_SPRAM256KA",
                i_ADDRESS=addr,
                i_DATAIN=Cat(self.wr_data, self.wr_data),
                i_MASKWREN=mask,
                i_WREN=self.wr_en & (lane[1:] == i),
                i_CHIPSELECT=Const(1, 1),
                i_CLOCK=ClockSignal("sync"),
                i_STANDBY=Const(0, 1),
                i_SLEEP=Const(0, 1),
                i_POWEROFF=Const(1, 1),
                o_DATAOUT=data_out,
            )
            m.d.comb += self.rd_data[SPRAM_BITS * i:SPRAM_BITS * (i + 1)].eq(data_out)
        return m


def _byte_enables(enable, index):
    """A one-hot byte-enable vector: bit ``index`` set when ``enable``."""
    return Cat(*[enable & (index == b) for b in range(WORD_BYTES)])


class ScratchMemory(wiring.Component):
    """The scratch memory: ``hw.scratch_words`` int16 words with one write port and two
    registered read ports X and Y (iCE40 EBR, 256 words each; yosys gives the second read port
    its own copy of the EBRs, so it costs ``scratch_words / 256`` more EBR and no logic).

    Ports
    -----
    x_addr, y_addr : In(range(scratch_words))
        Read addresses; ``x_data`` / ``y_data`` are the words at the addresses of the previous
        cycle (registered reads).
    x_data, y_data : Out(signed(16))
    wr_en, wr_addr, wr_data : In
        Write ``wr_data`` to ``wr_addr`` at the end of a cycle with ``wr_en``. A read of the
        same address in the same cycle returns the old word; a read in a later cycle the new one.
    """

    def __init__(self, hw: HardwareConfig):
        if not isinstance(hw, HardwareConfig):
            raise ValueError(f"ScratchMemory needs a firmware.isa.HardwareConfig, not {hw!r}")
        self.words = hw.scratch_words
        super().__init__({
            "x_addr": In(range(self.words)),
            "x_data": Out(signed(16)),
            "y_addr": In(range(self.words)),
            "y_data": Out(signed(16)),
            "wr_en": In(1),
            "wr_addr": In(range(self.words)),
            "wr_data": In(signed(16)),
        })

    def elaborate(self, platform):
        m = Module()
        # Bit slices as deep as the memory: an iCE40 EBR holds 4096 bits as 256 x 16 .. 2048 x 2,
        # so 2048 words are eight 2048 x 2 EBRs side by side, with no read multiplexer (one
        # 2048 x 16 memory became 256 x 16 EBRs and an 8:1 multiplexer per read port)
        width = max(1, min(16, 4096 // self.words))
        while 16 % width:
            width -= 1
        for i in range(0, 16, width):
            m.submodules[f"bits{i}"] = mem = memory.Memory(shape=width, depth=self.words, init=[])
            x_rd, y_rd, wr = mem.read_port(), mem.read_port(), mem.write_port()
            m.d.comb += [
                x_rd.addr.eq(self.x_addr), self.x_data[i:i + width].eq(x_rd.data),
                y_rd.addr.eq(self.y_addr), self.y_data[i:i + width].eq(y_rd.data),
                wr.addr.eq(self.wr_addr), wr.data.eq(self.wr_data[i:i + width]),
                wr.en.eq(self.wr_en),
            ]
        return m
