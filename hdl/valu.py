"""The element ALU ("VALU") of the v2 accelerator core: ``mmfree.firmware.valu.valu`` in
gateware, one element per cycle.

Per element (firmware/valu.py is the specification)::

    p = a · b · m                                     a int17, b int16, m uint16: |p| < 2**47
    q = rshift_round(p, s)  (ROUND)   or   trunc(p / 2**s)  (TRUNC, s <= 16)
    y = c + q                                         c int17
    sat16(y)  (Out.SAT16)   or   min(max(y, 0), 65535)  (Out.U16)

and in SIGMOID mode ``arith.sigmoid_q(a)`` (``a`` an int16; ``b``, ``m``, ``c``, ``s`` and
``out`` are ignored) through the same multipliers, with the table ``arith.sigmoid_lut()`` in a
ROM (two EBRs).
"""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from mmfree.firmware.valu import (A_BITS, B_BITS, C_BITS, M_BITS, S_BITS, SIG_SHIFT, Mode)
from mmfree.models.arith import SIG_LUT_SIZE, sigmoid_lut

__all__ = ["VALU", "ValuBeat", "ValuResult", "ABSMAX_BITS", "LATENCY"]

ABSMAX_BITS = 31                 # absmax is exact while |a·b·m| < 2**31
LATENCY = 6
Y_BITS = 16

_LUT = [int(v) for v in sigmoid_lut()]
_DIFF = [_LUT[min(k + 1, SIG_LUT_SIZE - 1)] - _LUT[k] for k in range(SIG_LUT_SIZE)]
_L_BITS = max(_LUT).bit_length()             # 16: L[k] <= 2**15
_D_BITS = max(_DIFF).bit_length()            # 10: L[k+1] - L[k] <= 512
_IDX_BITS = (SIG_LUT_SIZE - 1).bit_length()  # 8
_SAT_BITS = _IDX_BITS + SIG_SHIFT            # 14: |x| saturates at 2**14 - 1

_P_BITS = 47                     # |a·b·m| <= 2**16 · 2**15 · (2**16 - 1) < 2**47
_T_BITS = 18                     # t = floor(2|p| / 2**s), clamped: c ± (t >> 1) decides y
_CS_BITS = _T_BITS + 7           # after the coarse (byte) shift: room for 0..7 more
_Z_BITS = 19                     # c (17 bits) ± |q| (<= 2**17)

# the delay rings: _RING entries at the top of the tables' address space
_RING_BITS = 3
_RING = 1 << _RING_BITS
_TABLE_DEPTH = SIG_LUT_SIZE                      # 256
_RING_BASE = _TABLE_DEPTH - _RING
# a ring entry is never read in the cycle it is written, nor a table entry ever written: no
# read/write collision logic (yosys would otherwise emulate read-first with fabric registers)
_NO_RW_CHECK = {"no_rw_check": 1}
_SIG_FLAT = next(k for k in range(SIG_LUT_SIZE) if all(v == _LUT[-1] for v in _LUT[k:]))
assert _SIG_FLAT <= _RING_BASE - _RING and _DIFF[-1] == 0  # k >= _SIG_FLAT: L = 2**15, D = 0


class ValuBeat(data.StructLayout):
    """One VALU element: the operands of ``firmware.valu.valu`` and a ``tag`` passed through."""

    def __init__(self, tag_width: int):
        super().__init__({
            "a": signed(A_BITS), "b": signed(B_BITS), "m": unsigned(M_BITS),
            "c": signed(C_BITS), "s": unsigned(S_BITS), "mode": unsigned(2), "out": unsigned(1),
            "tag": unsigned(tag_width),
        })


class ValuResult(data.StructLayout):
    """``y``: the result's 16-bit pattern (int16 for Out.SAT16, uint16 for Out.U16) and the
    element's ``tag``."""

    def __init__(self, tag_width: int):
        super().__init__({"y": unsigned(Y_BITS), "tag": unsigned(tag_width)})


class VALU(wiring.Component):
    """The shared element ALU, bit-exact with ``mmfree.firmware.valu.valu``.

    Parameters
    ----------
    tag_width : int
        Bits of ``tag`` (>= 1), carried from input to output unchanged (destination, ``last``).

    Ports
    -----
    i_stream : In(stream.Signature(ValuBeat(tag_width)))
        ``{a: signed(17), b: signed(16), m: unsigned(16), c: signed(17), s: unsigned(6),
        mode: unsigned(2) (Mode: ROUND 0, TRUNC 1, SIGMOID 2; 3 acts as ROUND),
        out: unsigned(1) (Out: SAT16 0, U16 1), tag}``, up to one element per cycle.
        TRUNC is exact for ``s <= 16`` (TRUNC_MAX_SHIFT), ROUND for every ``s``. SIGMOID uses
        ``a`` alone (an int16 in the 17-bit field) and always gives a U16 result.
    o_stream : Out(stream.Signature(ValuResult(tag_width)))
        ``{y: unsigned(16), tag}`` in input order: ``y`` is ``valu(...) & 0xFFFF``.
    absmax : Out(unsigned(31))
        ``max |a·b·m|`` over the elements counted since the last ``absmax_clear`` (0 after a
        clear or reset), exact while every ``|a·b·m| < 2**31`` (SIGMOID elements count their
        internal product ``w·D``; do not mix them into a pass that needs absmax). An element
        is counted at the clock edge that moves it from stage 3 into stage 4, two cycles
        before its result reaches the output register: absmax includes it at the latest from
        the first cycle in which its ``o_stream.valid`` is high (``latency`` cycles after it
        was accepted when the output is never held back), and in any case once ``busy`` is
        low.
    absmax_clear : In(1)
        Strobe: absmax becomes 0 at the end of the cycle (a clear wins over an update in the
        same cycle). Elements that move into stage 4 after that edge are counted, those that
        moved before are not. So a clear strobed while ``busy`` is low, or in the very cycle
        the first element of a pass is accepted (it reaches stage 4 four cycles later at the
        earliest), starts that pass exactly; elements still inside stages 0..3 when it is
        strobed count towards the new maximum.
    busy : Out(1)
        An element is inside the pipeline (accepted, its result not yet taken).

    Latency and throughput
    ----------------------
    ``o_stream.valid`` rises ``latency`` = 6 cycles after the cycle in which an element
    transfers; one element per cycle. Back-pressure stalls the whole pipeline:
    ``i_stream.ready = ~o_stream.valid | o_stream.ready`` (one gate from ``o_stream.ready``),
    so ready drops exactly while a finished element waits to be taken. ``o_stream.ready`` may
    drop at any time.

    Datapath: sign and magnitude (register stages 0..5; three SB_MAC16, four EBR)
    --------
    Every product is unsigned 16x16 (yosys folds a signed-by-unsigned product with a
    post-adder into LUT adders; unsigned ones map whole), and the sign ``sp = sign(a) ^
    sign(b)`` travels beside the magnitude. What only travels (m, c, s, mode, out, sp, tag)
    is not carried by fabric registers but written into small EBR rings at acceptance and
    read back where it is needed: a 3-bit pointer ``wp`` steps with every pipeline advance,
    so an element accepted at ``wp = w`` sits in ring entry ``w`` for 8 advances. Three
    memories (``no_rw_check``: a ring entry is never read in the cycle it is written):

    * MD (1 EBR): the sigmoid differences ``D`` at 0..247, the ring of ``m`` at 248..255;
    * CL (2 EBR): ``L`` at 0..247, ``2**15 - L`` at 256..503, the ring of ``c[0:16]`` at
      248..255 (entries ``k >= 178`` of the tables are all alike, so the sigmoid index is
      folded below 248);
    * MISC (1 EBR): per element the sigmoid index or ``s`` and TRUNC, SIGMOID, ``c[16]``,
      ``out``, ``sp`` and ``tag``.

    0. ``a_op = a[0:16] ^ sign(a)`` (``|a| - sign(a)``: 16 bits even for ``a = -2**16``),
       ``b_op = |b|`` and ``cd1 = sign(a) ? |b| : 0`` (SB_MAC16 operand registers); the
       MD address (the sigmoid index or the ring entry); m, c and MISC are written.
    1. ``P1 = a_op·b_op + cd1 = |a|·|b| <= 2**31`` (one SB_MAC16 with its post-adder); MD is
       read: ``m`` (or ``D``).
    2. ``LO = P1[0:16]·m``, ``HI = P1[16:32]·m`` (two SB_MAC16, ``m`` straight from the EBR);
       MISC is read.
    3. ``|p| = LO + HI·2**16`` (one 32-bit add); ``u = 2|p|`` shifted right by
       ``8·(s >> 3)`` into 25 bits, whether that fits, the OR of the dropped bits; absmax;
       CL is read at the ring entry (``c``) or, for SIGMOID, at ``L`` / ``2**15 - L``.
    4. ``t = floor(|p| / 2**(s-1))`` (its low 18 bits; ``ovf`` when it does not fit);
       ``z = c + (t >> 1) + r`` for ``p >= 0`` and ``z = c - (t >> 1) - r = c + ~(t >> 1) +
       ~r`` for ``p < 0``, one carry chain with ``r ^ sp`` riding in as bit 0; the rounding
       bit ``r`` = ``t[0]`` (round half up: ROUND of ``p >= 0``, SIGMOID), ``t[0] & sticky``
       (round half down: ROUND of ``p < 0``, since ``rshift_round(-v) =
       -round_half_down(v)``) or 0 (TRUNC: ``trunc(p / 2**s) = ±floor(|p| / 2**s)``).
    5. ``y = z`` saturated to int16 or uint16, or the limit of ``sp``'s side when ``ovf``
       (``|q| >= 2**17`` saturates for any ``c``); the output register.

    Sigmoid (``arith.sigmoid_q``): for ``x >= 0`` the table index is ``k = x >> 6`` and the
    weight ``w = x & 63``; for ``x < 0`` both come from ``~x = |x| - 1`` with weight
    ``(~x & 63) + 1`` (weight 64 reaches the next entry exactly), so no negation is needed;
    ``|x| >= 2**14`` saturates the index (its difference is 0). ``w = a_op + cd1`` with
    ``b_op = 1``, ``m = D``, ``s = 6``, and ``σ = L + round(w·D / 64)`` or, with ``sp = 1``,
    ``(2**15 - L) - round(w·D / 64)``.
    """

    latency = LATENCY

    def __init__(self, tag_width: int = 1):
        if not isinstance(tag_width, int) or tag_width < 1:
            raise ValueError(f"VALU tag_width must be an integer >= 1 (use 1 and tie it to 0 "
                             f"when no tag is needed), not {tag_width!r}")
        self.tag_width = tag_width
        super().__init__({
            "i_stream": In(stream.Signature(ValuBeat(tag_width))),
            "o_stream": Out(stream.Signature(ValuResult(tag_width))),
            "absmax": Out(unsigned(ABSMAX_BITS)),
            "absmax_clear": In(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        tw = self.tag_width

        def reg(shape, name):        # datapath registers: no reset (they fold into SB_MAC16s)
            return Signal(shape, name=name, reset_less=True)

        valid = Signal(LATENCY)
        advance = ~self.o_stream.valid | self.o_stream.ready
        m.d.comb += [self.i_stream.ready.eq(advance), self.o_stream.valid.eq(valid[-1]),
                     self.busy.eq(valid.any())]
        with m.If(advance):
            m.d.sync += valid.eq(Cat(self.i_stream.valid, valid[:-1]))

        def delay(value, name, stages):
            """``value`` through ``stages`` registers that advance with the pipeline."""
            for k in range(stages):
                r = reg(value.shape(), f"{name}_d{k}")
                with m.If(advance):
                    m.d.sync += r.eq(value)
                value = r
            return value

        ip = self.i_stream.p

        # ring pointer: one step per pipeline advance, so the element accepted with wp = w is
        # found at ring entry w while it sits in any stage (the rings hold _RING elements)
        wp = Signal(_RING_BITS)
        with m.If(advance):
            m.d.sync += wp.eq(wp + 1)

        # MD: the sigmoid differences D (entries 0.._RING_BASE-1) and the ring of m
        md = Memory(shape=unsigned(M_BITS), depth=_TABLE_DEPTH,
                    init=_DIFF[:_RING_BASE] + [0] * _RING, attrs=_NO_RW_CHECK)
        # CL: L (0..), 2**15 - L (_TABLE_DEPTH..) and the ring of c[0:16]
        cl = Memory(shape=unsigned(16), depth=2 * _TABLE_DEPTH,
                    init=(_LUT[:_RING_BASE] + [0] * _RING
                          + [(1 << 15) - v for v in _LUT[:_RING_BASE]] + [0] * _RING),
                    attrs=_NO_RW_CHECK)
        # MISC: the per-element control fields, read two advances after the write
        misc_layout = data.StructLayout({
            "x": unsigned(_IDX_BITS),     # sigmoid: the table index; else s and TRUNC
            "sig": unsigned(1), "c16": unsigned(1), "out": unsigned(1), "sp": unsigned(1),
            "tag": unsigned(tw)})
        misc = Memory(shape=misc_layout, depth=_RING, init=[], attrs=_NO_RW_CHECK)
        m.submodules.md = md
        m.submodules.cl = cl
        m.submodules.misc = misc

        def read_port(mem, name):
            """A synchronous read port that advances with the pipeline, written as an
            asynchronous port and a register: yosys merges the two into the EBR and, with
            ``no_rw_check``, adds no read-first emulation (a sync port from Amaranth always
            asks for read-first on a collision, which the EBR does not have)."""
            port = mem.read_port(domain="comb")
            # an undefined power-up value spares an AND gate per bit that would fake a zero on
            # the EBR output; only for a board build (a platform): yosys writes it as Verilog
            # that Icarus and Verilator reject ("{0{1'b0}}")
            data = Signal(mem.shape, name=f"{name}_data", reset_less=True,
                          attrs={"init": ""} if platform is not None else {})
            with m.If(advance):
                m.d.sync += data.eq(port.data)
            return port.addr, data

        md_w, cl_w, misc_w = md.write_port(), cl.write_port(), misc.write_port()
        md_raddr, md_rdata = read_port(md, "md")
        cl_raddr, cl_rdata = read_port(cl, "cl")
        misc_raddr, misc_rdata = read_port(misc, "misc")
        ring_addr = Cat(wp, C((1 << (_IDX_BITS - _RING_BITS)) - 1, _IDX_BITS - _RING_BITS))

        # ---- cycle 0: magnitudes and signs; everything that only travels goes into the rings
        sig = ip.mode == Mode.SIGMOID
        sa = ip.a[-1]                                    # sign of a (of x for SIGMOID)
        sb = ip.b[-1] & ~sig
        sp = sa ^ sb                                     # sign of p
        a_ones = ip.a[:16] ^ sa.replicate(16)            # |a| - sa: 16 bits even for -2**16
        # the table index: k = |x| >> 6, saturated; every k >= _SIG_FLAT reads the same entry,
        # so the ring entries (_RING_BASE..) are replaced by one below them
        kk = a_ones[SIG_SHIFT:_SAT_BITS] | a_ones[_SAT_BITS].replicate(_IDX_BITS)
        ka = Cat(kk[:_RING_BITS], kk[_RING_BITS] & ~kk[_RING_BITS + 1:].all(),
                 kk[_RING_BITS + 1:])
        b_abs = Mux(ip.b[-1], -ip.b, ip.b)[:16]
        a_op = reg(unsigned(16), "a_op")
        b_op = reg(unsigned(16), "b_op")
        cd1 = reg(unsigned(16), "cd1")
        md_addr = reg(unsigned(_IDX_BITS), "md_addr")
        b_eff = Mux(sig, 1, b_abs)
        with m.If(advance):
            m.d.sync += [
                # sigmoid: the weight w = (x & 63) or (~x & 63) + 1 = a_op + cd1
                a_op.eq(Cat(a_ones[:SIG_SHIFT], a_ones[SIG_SHIFT:] & ~sig.replicate(16 - SIG_SHIFT))),
                b_op.eq(b_eff),
                cd1.eq(Mux(sa, b_eff, 0)),               # |a|·|b| = (|a| - sa)·|b| + sa·|b|
                md_addr.eq(Mux(sig, ka, ring_addr)),
            ]
        m.d.comb += [
            md_w.addr.eq(ring_addr), md_w.data.eq(ip.m), md_w.en.eq(advance),
            cl_w.addr.eq(ring_addr), cl_w.data.eq(ip.c[:16]), cl_w.en.eq(advance),
            misc_w.addr.eq(wp), misc_w.en.eq(advance),
            misc_w.data.x.eq(Mux(sig, ka, Cat(ip.s, ip.mode == Mode.TRUNC))),
            misc_w.data.sig.eq(sig),
            misc_w.data.c16.eq(ip.c[-1] & ~sig),
            misc_w.data.out.eq(sig | ip.out),
            misc_w.data.sp.eq(sp),
            misc_w.data.tag.eq(ip.tag),
        ]

        # ---- cycle 1: P1 = |a|·|b| (<= 2**31); MD is read (m, or D for SIGMOID)
        p1 = reg(unsigned(32), "p1")
        # p1 is the A input register of the two SB_MAC16 of stage 2; `keep` on its D stops
        # yosys from also taking it as the output register of this one (it did both, which
        # left the product unconnected)
        p1_d = Signal(unsigned(32), attrs={"keep": 1})
        m.d.comb += [p1_d.eq((a_op * b_op + cd1)[:32]),
                     md_raddr.eq(md_addr)]
        with m.If(advance):
            m.d.sync += p1.eq(p1_d)

        # ---- cycle 2: |p| = LO + HI·2**16, two unsigned 16x16 products; MISC is read
        lo = reg(unsigned(32), "lo")
        hi = reg(unsigned(32), "hi")
        with m.If(advance):
            m.d.sync += [
                lo.eq(p1[:16] * md_rdata),
                hi.eq(p1[16:] * md_rdata),
            ]
        m.d.comb += misc_raddr.eq(wp - 2)

        # ---- cycle 3: |p| (< 2**47), u = 2|p| >> 8·(s >> 3) into 25 bits; CL is read
        ctl = misc_rdata
        sig3 = ctl.sig
        s3 = Mux(sig3, SIG_SHIFT, ctl.x[:S_BITS])
        trunc3 = ctl.x[S_BITS] & ~sig3
        m.d.comb += [cl_raddr.eq(Mux(sig3, Cat(ctl.x, ctl.sp), Cat((wp - 3)[:_RING_BITS], C(-1, _IDX_BITS - _RING_BITS), C(0, 1)))),
]
        # all 32 bits of hi are used (bit 31 is always 0, which yosys cannot know): with a
        # 31-bit use it no longer folds the hi register into its SB_MAC16
        p_hi = Signal(32)
        m.d.comb += p_hi.eq(lo[16:] + hi)
        p_abs = Cat(lo[:16], p_hi)[:_P_BITS]
        u = Cat(C(0, 1), lo[:16], p_hi)                  # 2|p|: 49 bits
        k = s3[3:]
        coarse = (u >> Cat(C(0, 3), k))[:_CS_BITS]
        chunks = [u[i:i + 8].any() for i in range(_CS_BITS, len(u), 8)]
        fits_k = [~Cat(*chunks[j:]).any() if j < len(chunks) else C(1, 1) for j in range(8)]
        # ROUND of a negative p rounds |p| half down: every dropped bit counts, for any s
        byte_any = [u[i:i + 8].any() for i in range(0, len(u), 8)]
        sticky_k = [C(0, 1)]
        for j in range(7):
            sticky_k.append(sticky_k[-1] | byte_any[j] if j < len(byte_any) else sticky_k[-1])
        cs = reg(unsigned(_CS_BITS), "cs")
        cs_fits = reg(1, "cs_fits")
        sticky3 = reg(1, "sticky3")
        f3 = reg(3, "f3")
        floor3 = reg(1, "floor3")
        down3 = reg(1, "down3")
        sp3 = reg(1, "sp3")
        c16_3 = reg(1, "c16_3")
        with m.If(advance):
            m.d.sync += [
                cs.eq(coarse),
                cs_fits.eq(Cat(*fits_k).bit_select(k, 1)),
                sticky3.eq(Cat(*sticky_k).bit_select(k, 1)),
                f3.eq(s3[:3]),
                floor3.eq(trunc3),
                down3.eq(~sig3 & ~trunc3 & ctl.sp),
                sp3.eq(ctl.sp),
                c16_3.eq(ctl.c16),
            ]
        # absmax: an element is counted at the edge that moves it from stage 2 to stage 3 (its
        # |p| is formed from the stage-2 registers lo and hi)
        absmax = Signal(unsigned(ABSMAX_BITS))
        m.d.comb += self.absmax.eq(absmax)
        with m.If(advance & valid[2] & (p_abs[:ABSMAX_BITS] > absmax)):
            m.d.sync += absmax.eq(p_abs[:ABSMAX_BITS])
        with m.If(self.absmax_clear):
            m.d.sync += absmax.eq(0)
        out3, tag3 = (delay(v, n, 1) for v, n in ((ctl.out, "out"), (ctl.tag, "tag")))

        # ---- cycle 4: t = min(u >> s, 2**18 - 1); z = c ± ((t >> 1) + rounding bit)
        top_zero = [~cs[_T_BITS + f:].any() for f in range(_CS_BITS - _T_BITS)] + [C(1, 1)]
        fine_fits = Cat(*top_zero[:8]).bit_select(f3, 1)
        fine = (cs >> f3)[:_T_BITS]
        dropped = [C(0, 1)] + [cs[:f].any() for f in range(1, 8)]
        sticky = sticky3 | Cat(*dropped).bit_select(f3, 1)
        # |q| >= 2**17 saturates y for any c: the output stage forces it (t is then junk)
        t = Signal(unsigned(_T_BITS))
        m.d.comb += t.eq(fine)
        ovf = ~(cs_fits & fine_fits)
        rbit = Mux(floor3, 0, Mux(down3, t[0] & sticky, t[0]))
        c4 = Cat(cl_rdata, c16_3).as_signed()           # c, L or 2**15 - L
        z = reg(signed(_Z_BITS), "z")
        with m.If(advance):
            # c + q (p >= 0) or c - q = c + ~(t >> 1) + ~rbit (p < 0) as one carry chain: the
            # rounding bit rides in as bit 0
            m.d.sync += z.eq((Cat(C(1, 1), c4.as_signed()).as_signed()
                              + Cat(rbit ^ sp3, t[1:] ^ sp3.replicate(_T_BITS - 1),
                                    sp3.replicate(_Z_BITS - _T_BITS + 1)).as_signed())[1:])
        out4, tag4, ovf4, sp4 = (delay(v, n, 1) for v, n in
                                 ((out3, "out"), (tag3, "tag"), (ovf, "ovf"), (sp3, "sp")))

        # ---- cycle 5: y = z, saturated
        sat_fits = (z[Y_BITS - 1:] == 0) | (z[Y_BITS - 1:] == (1 << (_Z_BITS - Y_BITS + 1)) - 1)
        u16_fits = z[Y_BITS:] == 0
        passes = ~ovf4 & Mux(out4, u16_fits, sat_fits)
        low = Mux(ovf4, sp4, z[-1])                      # saturates low (else high)
        # SAT16: 0x8000 / 0x7FFF, U16: 0 / 0xFFFF
        y_limit = Cat(~low.replicate(Y_BITS - 1), Mux(out4, ~low, low))
        y = reg(unsigned(Y_BITS), "y")
        with m.If(advance):
            m.d.sync += y.eq(Mux(passes, z[:Y_BITS], y_limit))
        tag5 = delay(tag4, "tag", 1)
        m.d.comb += [self.o_stream.p.y.eq(y), self.o_stream.p.tag.eq(tag5)]
        return m
