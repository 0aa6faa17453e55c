"""The board's side of the host link: SLIP framing, CRC-16, the one-frame receive buffer, the
command decoder and the reply encoder, between the UART byte streams (hdl/uart.py) and the
accelerator core. Every constant of the protocol comes from :mod:`mmfree.protocol` (docs there).

Also here: :class:`StubCore` and :class:`StubBoard`, TEST DOUBLES of the accelerator core and of
the board top, so that the link (and the host library) can be tested before the core exists.
"""


import struct

from amaranth import C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree import protocol as P
from mmfree.hdl.uart import UARTRx, UARTTx

__all__ = [
    "BODY_MAX", "INFO_LEN", "LoadBeat", "StartBeat", "DoneBeat", "SlipByte", "ReplyByte",
    "link_core_members", "core_port_members", "connect_core",
    "SerialCRC", "SlipDecoder", "SlipEncoder", "LinkLayer",
    "StubCore", "StubBoard", "STUB_HEADER_MAGIC", "stub_token_result", "stub_logit", "stub_image",
]

BODY_MAX = P.MAX_PAYLOAD + 3                        # opcode + largest payload + crc16
INFO_LEN = struct.calcsize(P.INFO_FORMAT)
LOAD_HEADER_LEN = struct.calcsize(P.LOAD_HEADER_FORMAT)
LOAD_DATA_START = 1 + LOAD_HEADER_LEN               # body index of a LOAD's first data byte
LOAD_REPLY_LEN = struct.calcsize(P.LOAD_REPLY_FORMAT)
LOAD_DONE_LEN = struct.calcsize(P.LOAD_DONE_FORMAT)
TOKEN_REQUEST_LEN = struct.calcsize(P.TOKEN_REQUEST_FORMAT)
TOKEN_REPLY_LEN = struct.calcsize(P.TOKEN_REPLY_FORMAT)
ERROR_REPLY_LEN = 2                                 # error code u8, offending opcode u8
BUF_DEPTH = 512                                     # the receive buffer: one EBR (512 x 8)
N_ORIGIN = LOAD_DATA_START + 2                      # see LinkLayer.elaborate (n)
INFO_BASE = 448                                     # INFO bytes live in the buffer, above the body

CRC16_POLY, CRC16_INIT = 0x1021, 0xFFFF             # CRC-16/CCITT-FALSE (protocol.crc16)
CRC32_POLY_REFLECTED, CRC32_INIT = 0xEDB88320, 0xFFFFFFFF   # CRC-32/ISO-HDLC (zlib.crc32)


# --------------------------------------------------------------------------- the core interface

class LoadBeat(data.StructLayout):
    """One image byte for the core: ``addr`` (byte address, ``range(memory_bytes)``), ``data``."""

    def __init__(self, memory_bytes: int):
        super().__init__({"addr": range(memory_bytes), "data": 8})


class StartBeat(data.StructLayout):
    """Run one token: ``token`` (u16)."""

    def __init__(self):
        super().__init__({"token": 16})


class DoneBeat(data.StructLayout):
    """A token's result: ``next_token`` (argmax, u16), ``cycles`` (cycles this token took) and
    ``busy`` (of which the ternary core was busy), both u32. Field order = TOKEN reply order."""

    def __init__(self):
        super().__init__({"next_token": 16, "cycles": 32, "busy": 32})


class SlipByte(data.StructLayout):
    """A decoded SLIP item: a body byte (``end`` = 0) or a frame boundary (``end`` = 1)."""

    def __init__(self):
        super().__init__({"data": 8, "end": 1})


class ReplyByte(data.StructLayout):
    """A reply body byte for the SLIP encoder; ``last`` on the body's final byte."""

    def __init__(self):
        super().__init__({"data": 8, "last": 1})


def link_core_members(memory_bytes: int, max_vocab: int) -> dict:
    """The link layer's ports towards the core, seen from the link (see :class:`LinkLayer`)."""
    return {
        "load": Out(stream.Signature(LoadBeat(memory_bytes))),
        "start": Out(stream.Signature(StartBeat())),
        "done": In(stream.Signature(DoneBeat())),
        "reset_state": Out(1),
        "ready_state": In(1),
        "logit_addr": Out(range(max_vocab)),
        "logit_data": In(signed(16)),
        "model_ok": Out(1),
        "vocab_size": In(16),
        "header_ok": In(1, init=1),
    }


def core_port_members(memory_bytes: int, max_vocab: int) -> dict:
    """The same ports seen from the core (directions flipped), for the core's
    ``super().__init__({...})``, so both sides agree by construction."""
    return {name: member.flip() for name, member in link_core_members(memory_bytes, max_vocab).items()}


def connect_core(m: Module, link, core) -> None:
    """Connect every core port of ``link`` to the port of the same name of ``core``. A core
    without ``header_ok`` leaves it at its init value 1 (the link then checks only the
    vocabulary size at LOAD_DONE)."""
    for name, member in link_core_members(link.memory_bytes, link.max_vocab).items():
        if name == "header_ok" and not hasattr(core, name):
            continue
        ours, theirs = getattr(link, name), getattr(core, name)
        if member.is_signature:
            wiring.connect(m, ours, theirs)
        elif member.flow == Out:
            m.d.comb += theirs.eq(ours)
        else:
            m.d.comb += ours.eq(theirs)


# --------------------------------------------------------------------------- building blocks

class SerialCRC(wiring.Component):
    """Byte-wise CRC over bytes, table-driven: the 256-entry table is a ROM in block RAM (one
    EBR for a CRC-16, two for a CRC-32; EBRs are plentiful, logic cells are not), so the logic
    is one LUT per register bit plus the 8 XORs of the table index.

    Parameters: ``width``, ``poly`` (normal form for MSB-first CRCs, reflected form for
    LSB-first ones), ``init``, ``reflected`` (bits enter LSB first, the register shifts right).
    :meth:`crc16` and :meth:`crc32` make the two CRCs of the protocol.

    Ports: ``i_stream`` (In, 8 bits): one byte per transfer; ``ready`` is low for the cycle
    after a transfer (the table read), so a byte is absorbed every 2 cycles at most. ``crc``
    (Out(width)): the CRC register, no final XOR (zlib.crc32 = ``crc ^ 0xFFFFFFFF``), final
    when ``ready`` is high. ``clear`` (In(1)): load ``init`` (takes effect at the next edge;
    use it while idle and not feeding).
    """

    def __init__(self, width: int, poly: int, init: int, reflected: bool):
        self.width, self.poly, self.init, self.reflected = width, poly, init, reflected
        super().__init__({
            "i_stream": In(stream.Signature(8)),
            "clear": In(1),
            "crc": Out(width, init=init),
        })

    @classmethod
    def crc16(cls):
        """CRC-16/CCITT-FALSE, as :func:`mmfree.protocol.crc16`."""
        return cls(16, CRC16_POLY, CRC16_INIT, reflected=False)

    @classmethod
    def crc32(cls):
        """CRC-32/ISO-HDLC register (zlib.crc32 before its final XOR)."""
        return cls(32, CRC32_POLY_REFLECTED, CRC32_INIT, reflected=True)

    def _byte_step(self, crc: int, byte: int) -> int:
        """The CRC register after absorbing ``byte`` (Python, bit by bit)."""
        w, mask = self.width, (1 << self.width) - 1
        for k in range(8):
            if self.reflected:
                fb = (crc ^ (byte >> k)) & 1
                crc = (crc >> 1) ^ (self.poly if fb else 0)
            else:
                fb = (crc >> (w - 1) ^ byte >> (7 - k)) & 1
                crc = ((crc << 1) & mask) ^ (self.poly if fb else 0)
        return crc

    def elaborate(self, platform):
        m = Module()
        w, init = self.width, self.init
        # The register holds crc ^ init, so that it resets to 0 (an iCE40 flip-flop powers up
        # and resets to 0). The update is affine, so with x = crc ^ init:
        #   MSB first: x' = (x << 8) ^ G[x[w-8:] ^ byte],  G[k] = step(init ^ k << (w-8), 0) ^ init
        #   LSB first: x' = (x >> 8) ^ G[x[:8] ^ byte],     G[k] = step(init ^ k, 0) ^ init
        # (the constants of init fold into the table).
        x = Signal(w)
        m.d.comb += self.crc.eq(x ^ init)
        if self.reflected:
            table = [self._byte_step(init ^ k, 0) ^ init for k in range(256)]
            top, rest = x[:8], x >> 8
        else:
            table = [self._byte_step(init ^ (k << (w - 8)), 0) ^ init for k in range(256)]
            top, rest = x[w - 8:], (x << 8)[:w]
        m.submodules.table = rom = Memory(shape=w, depth=256, init=table)
        rd = rom.read_port()
        pending = Signal()              # the table entry of the byte just taken is being read
        m.d.comb += [self.i_stream.ready.eq(~pending), rd.addr.eq(top ^ self.i_stream.payload)]
        m.d.sync += pending.eq(self.i_stream.valid & ~pending & ~self.clear)
        with m.If(self.clear):
            m.d.sync += x.eq(0)
        with m.Elif(pending):
            m.d.sync += x.eq(rest ^ rd.data)
        return m


class SlipDecoder(wiring.Component):
    """SLIP decoder, the gateware twin of :class:`mmfree.protocol.FrameDecoder`'s byte rules.

    ``i_stream`` (In, 8 bits): line bytes. ``o_stream`` (Out, :class:`SlipByte`): END becomes a
    boundary item (``end`` = 1, also for empty frames: the consumer ignores those); ESC is
    swallowed and the byte after it translated (ESC_END → END, ESC_ESC → ESC, any other byte
    kept as is); an END right after an ESC still ends the frame. The output is registered
    (1 cycle latency, so the consumer's logic starts from flip-flops); ``i_stream.ready`` =
    the output register is empty or being taken.
    """

    i_stream: In(stream.Signature(8))
    o_stream: Out(stream.Signature(SlipByte()))

    def elaborate(self, platform):
        m = Module()
        i, o = self.i_stream, self.o_stream
        esc = Signal()                  # the previous byte was an ESC
        swallow = Signal()
        data = Signal(8)
        m.d.comb += [
            swallow.eq((i.payload == P.ESC) & ~esc),
            i.ready.eq(~o.valid | o.ready),
            data.eq(i.payload),
        ]
        with m.If(esc & (i.payload == P.ESC_END)):
            m.d.comb += data.eq(P.END)
        with m.Elif(esc & (i.payload == P.ESC_ESC)):
            m.d.comb += data.eq(P.ESC)
        with m.If(o.valid & o.ready):
            m.d.sync += o.valid.eq(0)
        with m.If(i.valid & i.ready):
            m.d.sync += [esc.eq(swallow), o.p.data.eq(data), o.p.end.eq(i.payload == P.END),
                         o.valid.eq(~swallow)]
        return m


class SlipEncoder(wiring.Component):
    """SLIP encoder: frames the reply bodies as ``END body END`` (:func:`protocol.encode_frame`).

    ``i_stream`` (In, :class:`ReplyByte`): body bytes, ``last`` on each body's final byte (a
    body has at least one byte). ``o_stream`` (Out, 8 bits): line bytes from an output register
    (1 cycle latency); END and ESC in the body go out as two bytes. ``i_stream.ready`` is low
    while the output register is full and not taken, while END or ESC is being inserted, and
    for the closing END.
    """

    i_stream: In(stream.Signature(ReplyByte()))
    o_stream: Out(stream.Signature(8))

    def elaborate(self, platform):
        m = Module()
        i, o = self.i_stream, self.o_stream
        need_start = Signal(init=1)     # the next body byte must be preceded by END
        pending_end = Signal()          # the closing END is still to be sent
        esc_pending = Signal()          # ESC was sent, the translated byte is next
        free = Signal()
        special = Signal()
        m.d.comb += [
            free.eq(~o.valid | o.ready),
            special.eq((i.p.data == P.END) | (i.p.data == P.ESC)),
            i.ready.eq(free & ~pending_end & ~need_start & (esc_pending | ~special)),
        ]
        with m.If(o.valid & o.ready):
            m.d.sync += o.valid.eq(0)

        def emit(byte):
            m.d.sync += [o.payload.eq(byte), o.valid.eq(1)]

        with m.If(free):
            with m.If(pending_end):
                emit(P.END)
                m.d.sync += [pending_end.eq(0), need_start.eq(1)]
            with m.Elif(i.valid):
                with m.If(need_start):
                    emit(P.END)
                    m.d.sync += need_start.eq(0)
                with m.Elif(esc_pending):
                    emit(Mux(i.p.data == P.END, P.ESC_END, P.ESC_ESC))
                    m.d.sync += [esc_pending.eq(0), pending_end.eq(i.p.last)]
                with m.Elif(special):
                    emit(P.ESC)
                    m.d.sync += esc_pending.eq(1)
                with m.Else():
                    emit(i.p.data)
                    m.d.sync += pending_end.eq(i.p.last)
        return m


# --------------------------------------------------------------------------- the link layer

def _lt_const(x, c: int):
    """``x < c`` for an unsigned value and a constant, as plain logic (a comparator on the
    carry chain costs a logic cell per bit; against a constant a few LUTs do)."""
    if c <= 0:
        return C(0, 1)
    result = C(0, 1)
    for i in range(len(x)):                     # LSB first: result = x[:i+1] < c[:i+1]
        if c >> i & 1:
            result = ~x[i] | result
        else:
            result = ~x[i] & result
    if c >= 1 << len(x):
        return C(1, 1)
    return result


def _in_range(x, lo: int, hi: int):
    """``lo <= x <= hi`` for an unsigned value and constants."""
    return ~_lt_const(x, lo) & _lt_const(x, hi + 1)


# reply kinds: where a reply's payload bytes come from
# (_REG: from the shift register R, LOAD and TOKEN, and the empty replies)
_ERROR, _INFO, _REG, _LOGITS = range(4)
# reply phases
_OP, _PAY, _CRC0, _CRC1 = range(4)


class LinkLayer(wiring.Component):
    """The command decoder of the host link, between the UART byte streams and the core.

    Parameter
    ---------
    info : mmfree.protocol.Info
        What INFO answers (stored in the receive buffer's EBR as initial contents) and the
        sizes the link checks against: ``memory_bytes`` (LOAD bounds, width of ``load.addr``)
        and ``max_vocab`` (width of ``logit_addr``; LOAD_DONE refuses a larger vocabulary).
        ``info.protocol`` must be :data:`mmfree.protocol.PROTOCOL_VERSION`.

    Ports (attributes ``memory_bytes``, ``max_vocab``)
    -----
    i_rx : In(stream.Signature(8))       bytes from the UART receiver (UARTRx.o_stream).
    o_tx : Out(stream.Signature(8))      bytes to the UART transmitter (UARTTx.i_stream).
    Towards the core (:func:`link_core_members`; :func:`connect_core` wires them by name):
    load : Out(stream of LoadBeat)       the bytes of accepted LOAD frames, ascending addresses
                                         within a frame, one every ~10 cycles; valid is held
                                         until ready (the core may stall at will).
    start : Out(stream of StartBeat)     TOKEN: run one token (only while ``model_ok``).
    done : In(stream of DoneBeat)        the token's result. The TOKEN reply reads the payload
                                         in place and takes it (ready) once the reply is out,
                                         so the core holds it meanwhile (the stream rule).
    reset_state : Out(1)                 RESET_STATE: a one-cycle strobe. The link then waits
    ready_state : In(1)                  for ``ready_state`` high, sampled from the cycle after
                                         the strobe on, so the core must hold it low in that
                                         cycle (register the strobe) until zeroing is done.
    logit_addr : Out(range(max_vocab))   LOGITS: logit index; ``logit_data`` (In, signed 16)
    logit_data : In(signed(16))          must be the registered read of that index (1 cycle).
    model_ok : Out(1)                    high after a good LOAD_DONE; low from reset, after any
                                         accepted LOAD (the image changed) and after a failed
                                         LOAD_DONE.
    vocab_size : In(16)                  V, read by the core from the image header. Used after
                                         LOAD_DONE's CRC check (V = 0 or V > max_vocab →
                                         MODEL_MISMATCH), for TOKEN (token >= V → BAD_TOKEN) and
                                         LOGITS (V values). Must follow the loaded bytes within
                                         a few cycles of their ``load`` transfer.
    header_ok : In(1, init=1)            the core's verdict on the image header (0 →
                                         MODEL_MISMATCH at LOAD_DONE); a core that does not
                                         check leaves it at 1.

    Protocol (mmfree/protocol.py)
    --------
    Receive: SLIP bytes are decoded into the one-frame buffer (an EBR holding ``BODY_MAX`` =
    MAX_PAYLOAD + 3 body bytes plus the INFO bytes); the CRC-16 of the body is computed as the
    bytes arrive (delayed by two bytes, the CRC field), the opcode and the first 8 payload bytes
    are also kept in registers. Every END ends a frame; an empty frame is ignored; any other
    frame, including garbage before a frame and a frame cut short by the next frame's leading
    END, gets exactly one reply. The receiver then listens again, so it resynchronizes on the
    next END. The link accepts a byte at most every 2 cycles (the table-driven CRC). It keeps
    receiving while an error reply goes out (the frame after garbage or a truncated frame is
    already on its way; it is answered once that error reply is out), but not while it
    executes a command or sends any other reply: the host sends its next request only after
    the reply (bytes sent earlier overrun the UART and are lost).

    Checks, in this order (the first failing one is the reply, ``OP_ERROR`` with ``error code,
    offending opcode`` = the body's first byte): body over BODY_MAX bytes → BAD_LENGTH (no CRC
    check); body under 3 bytes or CRC mismatch → BAD_CRC; opcode not a request → BAD_OPCODE;
    payload length wrong for the opcode → BAD_LENGTH; TOKEN/LOGITS while not ``model_ok`` →
    NO_MODEL; LOAD with address + data length > memory_bytes → BAD_ADDRESS; TOKEN with
    token >= vocab_size → BAD_TOKEN; LOAD_DONE → IMAGE_CRC, then MODEL_MISMATCH. A refused
    request changes nothing (except that a failed LOAD_DONE clears ``model_ok``).

    Commands:
      INFO → ``info.pack()``.
      LOAD (address u32, 1..LOAD_CHUNK data bytes) → the data bytes go to ``load`` at address,
        address + 1, ... only after the frame's CRC is good; reply ``address u32, length u16,
        crc16`` where crc16 = protocol.crc16 of the data bytes as handed to the core.
        Image check state: ``image_count`` and a CRC-32/ISO-HDLC (zlib.crc32) over the data
        bytes of every accepted LOAD frame, in the order received. A LOAD to address 0 starts
        a new image: both restart before its bytes are counted (and at reset). So a host that
        loads the image in ascending chunks from address 0 gets ``zlib.crc32(image)`` and
        ``len(image)``; a chunk accepted twice (a retry after a lost reply) counts twice. The
        count saturates at ``2 ** (memory_bytes.bit_length() + 1) - 1`` (>= 2·memory_bytes);
        a saturated count matches no length.
      LOAD_DONE (length u32, crc32 u32) → empty reply if length == image_count and crc32
        matches (else IMAGE_CRC), and the header fits (``header_ok``, 1 <= vocab_size <=
        max_vocab; else MODEL_MISMATCH); ``model_ok`` = the outcome. It does not restart the
        image check state, so a repeated LOAD_DONE gives the same answer.
      RESET_STATE → strobe, wait for ``ready_state``, empty reply. Allowed without a model.
      TOKEN (token u16) → ``start``, wait for ``done``; reply ``next_token u16, cycles u32,
        busy u32``.
      LOGITS → ``vocab_size`` int16 values (2·V bytes, little-endian) read through
        ``logit_addr``/``logit_data`` (the last token's logits, whatever the core holds).

    Replies are built a byte at a time (~11 cycles per body byte, well under a UART byte),
    CRC-16 computed on the fly, SLIP-encoded into ``o_tx``. The payloads of LOAD and TOKEN go
    out of an 80-bit shift register (the one the request's first payload bytes were shifted
    into; TOKEN loads ``done.payload`` into it), so the reply byte is a small multiplexer. The
    link waits for the core (``load.ready``, ``done``, ``ready_state``) without a time limit;
    everything else always completes, whatever bytes arrive. ``logit_addr`` also moves during
    other replies and LOADs (it is a read address, meaningful only during LOGITS).

    Resources (iCE40UP5K, 128 KiB image, max_vocab 256, alone): ~760 LC (of which the three
    table-driven CRCs ~95), 5 EBR (buffer, CRC tables), Fmax ~40 MHz depending on placement; the UART adds ~125 LC.
    """

    def __init__(self, info: P.Info):
        if not isinstance(info, P.Info):
            raise ValueError(f"LinkLayer needs a mmfree.protocol.Info, got {type(info).__name__}")
        try:
            self.info_bytes = info.pack()
        except struct.error as e:
            raise ValueError(f"LinkLayer: the Info does not pack into INFO_FORMAT ({e}): "
                             f"check its field ranges") from None
        if len(info.magic) != 4:
            raise ValueError(f"LinkLayer: Info.magic must be 4 bytes, got {info.magic!r}")
        if info.protocol != P.PROTOCOL_VERSION:
            raise ValueError(f"LinkLayer implements protocol version {P.PROTOCOL_VERSION}, "
                             f"the Info says {info.protocol}: build the Info with "
                             f"protocol=PROTOCOL_VERSION")
        if info.memory_bytes < 2:
            raise ValueError(f"LinkLayer: Info.memory_bytes must be at least 2, got {info.memory_bytes}")
        if info.max_vocab < 2:
            raise ValueError(f"LinkLayer: Info.max_vocab must be at least 2, got {info.max_vocab}")
        self.info = info
        self.memory_bytes = info.memory_bytes
        self.max_vocab = info.max_vocab
        super().__init__({
            "i_rx": In(stream.Signature(8)),
            "o_tx": Out(stream.Signature(8)),
            **link_core_members(self.memory_bytes, self.max_vocab),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.slip_dec = dec = SlipDecoder()
        m.submodules.slip_enc = enc = SlipEncoder()
        m.submodules.rx_crc = rx_crc = SerialCRC.crc16()     # request body, then LOAD data
        m.submodules.tx_crc = tx_crc = SerialCRC.crc16()     # reply body
        m.submodules.img_crc = img_crc = SerialCRC.crc32()   # the image, across LOAD frames
        wiring.connect(m, wiring.flipped(self.i_rx), dec.i_stream)
        wiring.connect(m, enc.o_stream, wiring.flipped(self.o_tx))

        init = [0] * BUF_DEPTH
        init[INFO_BASE:INFO_BASE + INFO_LEN] = self.info_bytes
        m.submodules.buf = buf = Memory(shape=8, depth=BUF_DEPTH, init=init)
        wr = buf.write_port()
        rd = buf.read_port()

        def nv(k):
            """The value of ``n`` once ``k`` body bytes are stored."""
            return (k - N_ORIGIN) % BUF_DEPTH

        mem_bits = self.memory_bytes.bit_length()
        vocab_bits = min(16, self.max_vocab.bit_length())
        # receive state. n counts the stored body bytes from N_ORIGIN on (it is the buffer's
        # write address): for a LOAD it ends equal to the data length, and data byte i sits at
        # buffer address i - 2 (mod BUF_DEPTH).
        n = Signal(9, init=nv(0))
        overflow = Signal()
        opcode = Signal(8)
        # R: the request's payload bytes, shifted in at the top (payload bytes 0..7, only 0..3
        # of a LOAD), later the reply payload of LOAD and TOKEN, shifted out at the bottom.
        # Fields once received: TOKEN token R[48:64]; LOAD address R[48:80]; LOAD_DONE length
        # R[16:48], crc32 R[48:80].
        R = Signal(80)
        d0, d1 = Signal(8), Signal(8)           # the two latest body bytes (d1 newest)
        address = R[48:80]
        # request checks, registered in CHECK
        crc_ok, op_known, len_ok, image_ok, token_ok, header_fits, addr_zero = (
            Signal(name=s) for s in ("crc_ok", "op_known", "len_ok", "image_ok", "token_ok",
                                     "header_fits", "addr_zero"))
        # LOAD bounds, address + length <= memory_bytes without a 32-bit adder: with the
        # address = H * 256 + L and 1 <= length <= 256, it holds for H < Mh - 1, never for
        # H > Mh, and else depends on L + length (Mh, Ml: memory_bytes = Mh * 256 + Ml).
        mem_h, mem_l = self.memory_bytes >> 8, self.memory_bytes & 0xFF
        addr_h = address[8:]
        lo_sum = Signal(10)                     # L + length
        h_below, h_edge, h_top = Signal(), Signal(), Signal()   # H < Mh - 1, = Mh - 1, = Mh
        # image check state: bytes counted (saturating: an image never exceeds memory_bytes)
        image_count = Signal(mem_bits + 1)
        count_full = Signal()
        count_inc = Signal(len(image_count) + 1)   # its carry out is the all-ones test
        m.d.comb += [count_inc.eq(image_count + 1), count_full.eq(count_inc[-1])]
        waddr = Signal.like(self.load.p.addr)
        # reply state
        kind = Signal(2)
        err_code = Signal(range(max(P.ERRORS) + 1))
        err_op = Signal(8)                      # an error reply's offending opcode
        max_reply = max(INFO_LEN, 2 * self.max_vocab, LOAD_REPLY_LEN, TOKEN_REPLY_LEN, P.LOAD_CHUNK)
        rem = Signal(range(max_reply + 1))      # reply payload (or LOAD data) bytes still to go
        j = Signal(max(10, (2 * self.max_vocab).bit_length()))   # payload byte index
        phase = Signal(2)
        tx_byte = Signal(8)
        tx_start = Signal()                     # the command FSM hands a reply to the TX FSM
        tx_idle = Signal()
        is_load = Signal()
        m.d.comb += is_load.eq(opcode == P.OP_LOAD)

        m.d.comb += [
            # INFO at INFO_BASE + j (INFO_BASE is a multiple of 64), else a LOAD's data byte j
            rd.addr.eq(Cat(j[:6], j[6:9] | Mux(kind == _INFO, 0b111, 0))),
            wr.addr.eq(n),
            wr.data.eq(dec.o_stream.p.data),
            self.logit_addr.eq(j[1:]),
            self.load.p.addr.eq(waddr),
            self.load.p.data.eq(rd.data),
            self.start.p.token.eq(R[48:64]),
        ]

        def reply(k, length):
            """Start sending a reply of kind ``k`` with ``length`` payload bytes (TX is idle)."""
            m.d.sync += [kind.eq(k), phase.eq(_OP)]
            m.d.comb += [tx_start.eq(1), tx_crc.clear.eq(1), j_zero.eq(1), rem_load.eq(1),
                         rem_val.eq(length)]
            m.next = "REPLY_WAIT"

        def listen():
            """Back to RECV with an empty buffer."""
            m.d.sync += [n.eq(nv(0)), overflow.eq(0)]
            m.d.comb += rx_crc.clear.eq(1)
            m.next = "RECV"

        def error():
            # an error reply needs only err_code and err_op: receive the next frame meanwhile
            # (after garbage or a truncated frame, the host's next frame is already arriving)
            m.d.sync += err_op.eq(opcode)
            reply(_ERROR, ERROR_REPLY_LEN)
            listen()

        # R, j and rem change in one place each (below), so that every bit is one LUT + FF
        r_load, r_shift, j_zero, j_m2, j_inc, rem_load, rem_dec = (
            Signal(name=s) for s in ("r_load", "r_shift", "j_zero", "j_m2", "j_inc",
                                     "rem_load", "rem_dec"))
        rem_val = Signal.like(rem)
        fill = Signal(8)                        # the byte entering R at the top
        with m.If(r_load):
            m.d.sync += R.eq(self.done.p.as_value())
        with m.Elif(r_shift):
            m.d.sync += R.eq(Cat(R[8:], fill))
        with m.If(j_zero):
            m.d.sync += j.eq(0)
        with m.Elif(j_m2):
            m.d.sync += j.eq(-2)
        with m.Elif(j_inc):
            m.d.sync += j.eq(j + 1)
        with m.If(rem_load):
            m.d.sync += rem.eq(rem_val)
        with m.Elif(rem_dec):
            m.d.sync += rem.eq(rem - 1)

        # Signals that a state drives although none of their inputs has changed since reset
        # are unconditional assignments (fsm.ongoing): under cocotb, Icarus never evaluates an
        # `always @*` block whose inputs keep their initial values, which would leave them X.
        item = dec.o_stream
        with m.FSM() as fsm:
            with m.State("RECV"):
                with m.If(item.valid & item.ready):
                    with m.If(item.p.end):
                        with m.If(n != nv(0)):
                            m.next = "CHECK"
                    with m.Elif(n == nv(BODY_MAX)):
                        m.d.sync += overflow.eq(1)          # keep listening for the END
                    with m.Else():
                        m.d.comb += wr.en.eq(1)
                        m.d.sync += [n.eq(n + 1), d1.eq(item.p.data), d0.eq(d1)]
                        with m.If(n == nv(0)):
                            m.d.sync += opcode.eq(item.p.data)
                        # payload bytes 0..7 (0..3 of a LOAD) go into R
                        with m.If(_in_range(n, nv(1), nv(4)) |
                                  ~is_load & (~_lt_const(n, nv(1)) | _lt_const(n, nv(8) + 1))):
                            m.d.comb += r_shift.eq(1)
                        with m.If((n != nv(0)) & (n != nv(1))):    # d0 is no longer a CRC candidate
                            m.d.comb += [rx_crc.i_stream.valid.eq(1), rx_crc.i_stream.payload.eq(d0)]

            with m.State("CHECK"):
                with m.If(rx_crc.i_stream.ready & img_crc.i_stream.ready):
                    m.d.sync += [
                        crc_ok.eq((n != nv(1)) & (n != nv(2)) & (rx_crc.crc == Cat(d0, d1))),
                        image_ok.eq((R[16:48] == image_count) & ~count_full &
                                    ((img_crc.crc ^ 0xFFFFFFFF) == R[48:80])),
                        # (BAD_TOKEN is checked only with model_ok, so vocab_size <= max_vocab:
                        # a narrow comparator plus a zero test of the token's top bits)
                        token_ok.eq((R[48 + vocab_bits:64] == 0) &
                                    (R[48:48 + vocab_bits] < self.vocab_size[:vocab_bits])),
                        header_fits.eq(self.header_ok &
                                       _in_range(self.vocab_size, 1, self.max_vocab)),
                        addr_zero.eq(address == 0),
                        lo_sum.eq(address[:8] + n),             # n = a LOAD's data length
                        h_below.eq(_lt_const(addr_h, mem_h - 1)),
                        h_edge.eq(addr_h == mem_h - 1 if mem_h >= 1 else 0),
                        h_top.eq(addr_h == mem_h),
                        op_known.eq(0), len_ok.eq(0),
                    ]
                    with m.Switch(opcode):
                        with m.Case(P.OP_INFO, P.OP_RESET_STATE, P.OP_LOGITS):
                            m.d.sync += [op_known.eq(1), len_ok.eq(n == nv(3))]
                        with m.Case(P.OP_TOKEN):
                            m.d.sync += [op_known.eq(1), len_ok.eq(n == nv(3 + TOKEN_REQUEST_LEN))]
                        with m.Case(P.OP_LOAD_DONE):
                            m.d.sync += [op_known.eq(1), len_ok.eq(n == nv(3 + LOAD_DONE_LEN))]
                        with m.Case(P.OP_LOAD):
                            # at least one data byte; at most LOAD_CHUNK: a longer body overflows
                            m.d.sync += [op_known.eq(1),
                                         len_ok.eq(_in_range(n, nv(LOAD_DATA_START + 3),
                                                             nv(BODY_MAX)))]
                    m.next = "DECIDE"

            with m.State("DECIDE"):                         # the first failing check, in order
                with m.If(~tx_idle):
                    pass                        # an error reply (it reads err_code) is going out
                with m.Elif(overflow):
                    m.d.sync += err_code.eq(P.Error.BAD_LENGTH)
                with m.Elif(~crc_ok):
                    m.d.sync += err_code.eq(P.Error.BAD_CRC)
                with m.Elif(~op_known):
                    m.d.sync += err_code.eq(P.Error.BAD_OPCODE)
                with m.Elif(~len_ok):
                    m.d.sync += err_code.eq(P.Error.BAD_LENGTH)
                with m.Elif(((opcode == P.OP_TOKEN) | (opcode == P.OP_LOGITS)) & ~self.model_ok):
                    m.d.sync += err_code.eq(P.Error.NO_MODEL)
                with m.Elif(is_load & ~(h_below | h_edge & _lt_const(lo_sum, 256 + mem_l + 1) |
                                        h_top & _lt_const(lo_sum, mem_l + 1))):
                    m.d.sync += err_code.eq(P.Error.BAD_ADDRESS)
                with m.Elif((opcode == P.OP_TOKEN) & ~token_ok):
                    m.d.sync += err_code.eq(P.Error.BAD_TOKEN)
                with m.Elif((opcode == P.OP_LOAD_DONE) & ~image_ok):
                    m.d.sync += err_code.eq(P.Error.IMAGE_CRC)
                with m.Elif((opcode == P.OP_LOAD_DONE) & ~header_fits):
                    m.d.sync += err_code.eq(P.Error.MODEL_MISMATCH)
                with m.Else():
                    m.d.sync += err_code.eq(0)
                with m.If(tx_idle):
                    m.next = "DISPATCH"

            with m.State("DISPATCH"):                       # the TX FSM is idle here
                with m.If(err_code != 0):
                    # a refused LOAD_DONE unloads the model; a damaged body that merely
                    # starts with its opcode (garbage, a cut frame) is no LOAD_DONE
                    with m.If((opcode == P.OP_LOAD_DONE) & crc_ok & ~overflow):
                        m.d.sync += self.model_ok.eq(0)
                    error()
                with m.Elif(opcode == P.OP_INFO):
                    reply(_INFO, INFO_LEN)
                with m.Elif(is_load):
                    m.d.sync += [self.model_ok.eq(0), waddr.eq(address), kind.eq(_REG)]
                    m.d.comb += [j_m2.eq(1), rem_load.eq(1), rem_val.eq(n)]   # data byte 0: address -2
                    m.d.comb += rx_crc.clear.eq(1)          # now the CRC of the stored bytes
                    with m.If(addr_zero):                   # a new image
                        m.d.sync += image_count.eq(0)
                        m.d.comb += img_crc.clear.eq(1)
                    m.next = "WR_READ"
                with m.Elif(opcode == P.OP_LOAD_DONE):
                    m.d.sync += self.model_ok.eq(1)
                    reply(_REG, 0)
                with m.Elif(opcode == P.OP_RESET_STATE):
                    m.next = "RS_STROBE"
                with m.Elif(opcode == P.OP_TOKEN):
                    m.next = "TOK_START"
                with m.Else():                              # LOGITS
                    reply(_LOGITS, Cat(C(0, 1), self.vocab_size))

            with m.State("WR_READ"):                        # j reaches the EBR
                m.next = "WR_PUSH"
            with m.State("WR_PUSH"):                        # rd.data = data byte j
                m.d.comb += self.load.valid.eq(rx_crc.i_stream.ready & img_crc.i_stream.ready)
                with m.If(self.load.valid & self.load.ready):
                    m.d.comb += [
                        rx_crc.i_stream.valid.eq(1), rx_crc.i_stream.payload.eq(rd.data),
                        img_crc.i_stream.valid.eq(1), img_crc.i_stream.payload.eq(rd.data),
                    ]
                    m.d.sync += waddr.eq(waddr + 1)
                    m.d.comb += [j_inc.eq(1), rem_dec.eq(1)]
                    with m.If(~count_full):
                        m.d.sync += image_count.eq(count_inc[:-1])
                    with m.If(rem == 1):
                        m.next = "WR_CRC"
                    with m.Else():
                        m.next = "WR_READ"
            with m.State("WR_CRC"):                         # the last byte enters the CRC
                with m.If(rx_crc.i_stream.ready):
                    m.d.comb += j_zero.eq(1)
                    m.next = "WR_FILL"
            with m.State("WR_FILL"):
                # the LOAD reply in R: the address (R[48:80]) moves down to R[0:32] while
                # length u16 and crc16 enter at the top
                m.d.comb += [r_shift.eq(1), j_inc.eq(1)]
                with m.If(j == 5):
                    reply(_REG, LOAD_REPLY_LEN)

            with m.State("RS_STROBE"):
                m.d.comb += self.reset_state.eq(1)
                m.next = "RS_WAIT"
            with m.State("RS_WAIT"):
                with m.If(self.ready_state):
                    reply(_REG, 0)

            with m.State("TOK_START"):
                m.d.comb += self.start.valid.eq(1)
                with m.If(self.start.ready):
                    m.next = "TOK_WAIT"
            with m.State("TOK_WAIT"):                       # the reply is sent from R; done is
                with m.If(self.done.valid):                 # taken once the reply is out
                    m.d.comb += r_load.eq(1)
                    reply(_REG, TOKEN_REPLY_LEN)

            with m.State("REPLY_WAIT"):                     # the reply reads the request's registers
                with m.If(tx_idle & ~tx_start):
                    m.d.comb += self.done.ready.eq(kind == _REG)
                    listen()
        m.d.comb += item.ready.eq(fsm.ongoing("RECV") & rx_crc.i_stream.ready)
        with m.If(fsm.ongoing("RECV")):
            m.d.comb += fill.eq(item.p.data)
        with m.Else():
            with m.Switch(j[:2]):
                with m.Case(0):
                    m.d.comb += fill.eq(n[:8])
                with m.Case(1):
                    m.d.comb += fill.eq(n[8:])
                with m.Case(2):
                    m.d.comb += fill.eq(rx_crc.crc[:8])
                with m.Case(3):
                    m.d.comb += fill.eq(rx_crc.crc[8:])

        # The reply sender: opcode, payload, crc16 (LE), one byte per NEXT → LATCH → OFFER.
        with m.FSM(name="tx") as tx_fsm:
            with m.State("IDLE"):
                with m.If(tx_start):
                    m.next = "NEXT"
            with m.State("NEXT"):                           # addresses (j) settle
                with m.If(tx_crc.i_stream.ready):           # the previous byte is absorbed
                    m.next = "LATCH"
            with m.State("LATCH"):                          # registered reads are valid now
                with m.Switch(phase):
                    with m.Case(_OP):
                        m.d.sync += tx_byte.eq(Mux(kind == _ERROR, P.OP_ERROR, opcode | P.REPLY))
                    with m.Case(_CRC0):
                        m.d.sync += tx_byte.eq(tx_crc.crc[:8])
                    with m.Case(_CRC1):
                        m.d.sync += tx_byte.eq(tx_crc.crc[8:])
                    with m.Default():
                        with m.Switch(kind):
                            with m.Case(_ERROR):
                                m.d.sync += tx_byte.eq(Mux(j[0], err_op, err_code))
                            with m.Case(_INFO):
                                m.d.sync += tx_byte.eq(rd.data)
                            with m.Case(_REG):
                                m.d.sync += tx_byte.eq(R[:8])
                            with m.Case(_LOGITS):
                                m.d.sync += tx_byte.eq(Mux(j[0], self.logit_data[8:],
                                                           self.logit_data[:8]))
                m.next = "OFFER"
            with m.State("OFFER"):
                m.d.comb += [enc.i_stream.valid.eq(1), enc.i_stream.p.data.eq(tx_byte),
                             enc.i_stream.p.last.eq(phase == _CRC1)]
                with m.If(enc.i_stream.ready):
                    with m.If((phase == _OP) | (phase == _PAY)):
                        m.d.comb += [tx_crc.i_stream.valid.eq(1), tx_crc.i_stream.payload.eq(tx_byte)]
                    m.next = "NEXT"
                    with m.Switch(phase):
                        with m.Case(_OP):
                            m.d.sync += phase.eq(Mux(rem == 0, _CRC0, _PAY))
                        with m.Case(_PAY):
                            m.d.comb += [j_inc.eq(1), rem_dec.eq(1)]
                            with m.If(kind == _REG):        # (RECV may shift R meanwhile)
                                m.d.comb += r_shift.eq(1)
                            with m.If(rem == 1):
                                m.d.sync += phase.eq(_CRC0)
                        with m.Case(_CRC0):
                            m.d.sync += phase.eq(_CRC1)
                        with m.Case(_CRC1):
                            m.next = "IDLE"
        m.d.comb += tx_idle.eq(tx_fsm.ongoing("IDLE"))
        return m


# --------------------------------------------------------------------------- test doubles

STUB_HEADER_MAGIC = 0xA5    # StubCore's image byte 2 must be this for header_ok


def stub_token_result(token: int, vocab: int) -> P.TokenResult:
    """What :class:`StubCore` answers to ``token`` with vocabulary ``vocab`` (the Python twin)."""
    wait = 8 + (token & 7)
    return P.TokenResult(next_token=(token * 7 + 3) % vocab, cycles=(token << 16) | wait,
                         core_busy_cycles=0x5A000000 | (token * 3))


def stub_logit(last_token: int, index: int) -> int:
    """:class:`StubCore`'s logit ``index`` after ``last_token`` (int16; 0 before any token)."""
    v = (last_token * 31 + index * 97 + 12345) & 0xFFFF
    return v - 0x10000 if v & 0x8000 else v


def stub_image(vocab: int, length: int, *, header_ok: bool = True, seed: int = 0) -> bytes:
    """An image for :class:`StubCore`: vocab u16 LE, the header magic, then seeded bytes."""
    import random
    rng = random.Random(seed)
    head = struct.pack("<HB", vocab, STUB_HEADER_MAGIC if header_ok else STUB_HEADER_MAGIC ^ 0xFF)
    return (head + bytes(rng.randrange(256) for _ in range(max(0, length - len(head)))))[:length]


class StubCore(wiring.Component):
    """TEST DOUBLE of the accelerator core: implements the core side of the link interface
    (:func:`core_port_members`) with trivial behaviour, to test the link and the host.

    - ``load``: bytes go to a byte memory of ``memory_bytes`` (attribute ``mem``, for tests).
      Image header: bytes 0-1 = vocab_size (u16 LE), byte 2 = :data:`STUB_HEADER_MAGIC` for
      ``header_ok``. With ``load_stall`` the core drops ``load.ready`` 3 cycles out of 8.
    - ``start`` → after ``8 + (token & 7)`` cycles ``done`` = :func:`stub_token_result`.
    - ``logit_data`` (registered) = :func:`stub_logit` of the last token and ``logit_addr``.
    - ``reset_state`` → ``ready_state`` low for 6 cycles from the cycle after the strobe.
    Observation ports: ``resets`` and ``tokens`` count strobes and tokens run.
    """

    def __init__(self, memory_bytes: int, max_vocab: int, *, load_stall: bool = False):
        self.memory_bytes, self.max_vocab, self.load_stall = memory_bytes, max_vocab, load_stall
        self.mem = Memory(shape=8, depth=memory_bytes, init=[])
        super().__init__({**core_port_members(memory_bytes, max_vocab),
                          "resets": Out(8), "tokens": Out(8)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = self.mem
        wr = self.mem.write_port()
        phase = Signal(3)
        m.d.sync += phase.eq(phase + 1)
        m.d.comb += [
            self.load.ready.eq(phase >= 3 if self.load_stall else 1),
            wr.addr.eq(self.load.p.addr), wr.data.eq(self.load.p.data),
            wr.en.eq(self.load.valid & self.load.ready),
        ]
        vocab = Signal(16)
        header = Signal(8)
        m.d.comb += [self.vocab_size.eq(vocab), self.header_ok.eq(header == STUB_HEADER_MAGIC)]
        with m.If(wr.en):
            with m.Switch(self.load.p.addr):
                with m.Case(0):
                    m.d.sync += vocab[:8].eq(self.load.p.data)
                with m.Case(1):
                    m.d.sync += vocab[8:].eq(self.load.p.data)
                with m.Case(2):
                    m.d.sync += header.eq(self.load.p.data)

        clearing = Signal(range(7))
        m.d.comb += self.ready_state.eq(clearing == 0)
        with m.If(self.reset_state):
            m.d.sync += [clearing.eq(6), self.resets.eq(self.resets + 1)]
        with m.Elif(clearing != 0):
            m.d.sync += clearing.eq(clearing - 1)

        token, last_token, x = Signal(16), Signal(16), Signal(20)
        waited = Signal(16)
        m.d.sync += self.logit_data.eq((last_token * 31 + self.logit_addr * 97 + 12345)[:16])
        with m.FSM() as fsm:
            with m.State("IDLE"):
                with m.If(self.start.valid):
                    tok = self.start.p.token
                    m.d.sync += [token.eq(tok), x.eq(tok * 7 + 3), waited.eq(0)]
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.sync += waited.eq(waited + 1)
                with m.If(x >= vocab):                      # x mod vocab, <= 7 subtractions
                    m.d.sync += x.eq(x - vocab)
                with m.If(waited + 1 == 8 + token[:3]):
                    m.d.sync += [
                        self.done.valid.eq(1), self.done.p.next_token.eq(x),
                        self.done.p.cycles.eq(Cat((waited + 1)[:16], token)),
                        self.done.p.busy.eq(0x5A000000 | (token * 3)),
                        last_token.eq(token), self.tokens.eq(self.tokens + 1),
                    ]
                    m.next = "DONE"
            with m.State("DONE"):
                with m.If(self.done.ready):
                    m.d.sync += self.done.valid.eq(0)
                    m.next = "IDLE"
        m.d.comb += self.start.ready.eq(fsm.ongoing("IDLE"))     # an assign: see LinkLayer
        return m


class StubBoard(wiring.Component):
    """TEST DOUBLE of the board top: UART pins → :class:`LinkLayer` → :class:`StubCore`.

    Parameters: ``info`` (the UART runs at ``info.baud`` from ``info.clock_hz``),
    ``load_stall`` (see StubCore). Ports: ``uart_rx`` In(1, init=1), ``uart_tx`` Out(1, init=1),
    ``rx_errors``/``rx_overruns`` Out(16) (the UART receiver's counters). Attributes ``link``,
    ``core``, ``uart_rx_unit``, ``uart_tx_unit``.
    """

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    rx_errors: Out(16)
    rx_overruns: Out(16)

    def __init__(self, info: P.Info, *, load_stall: bool = False):
        self.link = LinkLayer(info)
        self.core = StubCore(info.memory_bytes, info.max_vocab, load_stall=load_stall)
        self.uart_rx_unit = UARTRx(info.clock_hz, info.baud)
        self.uart_tx_unit = UARTTx(info.clock_hz, info.baud)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.link = self.link
        m.submodules.core = self.core
        m.submodules.uart_rx = urx = self.uart_rx_unit
        m.submodules.uart_tx = utx = self.uart_tx_unit
        wiring.connect(m, urx.o_stream, self.link.i_rx)
        wiring.connect(m, self.link.o_tx, utx.i_stream)
        connect_core(m, self.link, self.core)
        m.d.comb += [urx.rx.eq(self.uart_rx), self.uart_tx.eq(utx.tx),
                     self.rx_errors.eq(urx.rx_errors), self.rx_overruns.eq(urx.rx_overruns)]
        return m
