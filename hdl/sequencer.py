"""The sequencer of the accelerator core: fetches the per-token program from the weight memory, decodes
it with ``firmware.isa.instruction_layout`` and runs every macro-op as the sub-passes of
``firmware.valu.MICROCODE`` through one shared element ALU (:class:`~mmfree.hdl.valu.VALU`),
the norm statistics unit, the BitLinear scalars unit and the ternary core.

docs/isa.md is the instruction set; ``firmware.interpreter.Interpreter`` is the behavioural
specification this gateware matches bit for bit; :func:`program_cycles` is its exact cycle
count.
"""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.firmware import valu as vc
from mmfree.firmware.isa import WORD_BITS, HardwareConfig, Op, instruction_layout
from mmfree.firmware.valu import (ASrc, Base, BSrc, CSrc, Dst, MICROCODE, MSrc, Reduce,
                                  ShiftSrc, WKind)
from mmfree.hdl.primitives import bit_length
from mmfree.hdl.rmsnorm import NormStats
from mmfree.hdl.scalars import BitLinearScalars
from mmfree.hdl.ternary_core import TernaryCore
from mmfree.hdl.valu import VALU
from mmfree.models.arith import PRE_FRAC, QUANT_BITS

__all__ = ["StartBeat", "DoneBeat", "CoreUnits", "Sequencer", "program_cycles"]

#: width of the cycle and core-busy counters (DoneBeat carries them zero-extended to 32 bits; a
#: token of the largest model of ICEBREAKER takes ~10**5 cycles)
COUNTER_BITS = 24

#: registers between the memories' read data and the VALU's input (firmware CostModel.operand)
OPERAND_STAGES = 1

_OPS = {"EMBED": Op.EMBED, "NORM": Op.NORM, "BITLINEAR": Op.BITLINEAR, "MLGRU": Op.MLGRU,
        "GLU": Op.GLU, "RESADD": Op.RESADD}


def program_cycles(program, hw: HardwareConfig) -> list[tuple[int, int]]:
    """``(cycles, core_busy)`` of each instruction of ``program`` up to its first HALT on this
    sequencer: ``firmware.interpreter.CostModel`` with the latencies of the units
    :class:`CoreUnits` builds (tests check that they are the cost model's)."""
    from mmfree.firmware.interpreter import CostModel
    from mmfree.firmware.isa import Halt
    units = CoreUnits(hw)
    model = CostModel(lanes=hw.lanes, stats=units.stats.latency, valu=units.valu.latency,
                      scalars=units.scalars.max_cycles)
    out = []
    for insn in program:
        out.append(model.cost(insn))
        if isinstance(insn, Halt):
            break
    return out


class StartBeat(data.StructLayout):
    """Run one token: ``token`` (u16)."""

    def __init__(self):
        super().__init__({"token": 16})


class DoneBeat(data.StructLayout):
    """A token's result: ``next_token`` (ARGMAX), ``cycles`` (the token's cycles, from its
    first instruction fetch to the end of HALT) and ``busy`` (cycles in which the ternary core
    took a column)."""

    def __init__(self):
        super().__init__({"next_token": 16, "cycles": 32, "busy": 32})


class CoreUnits:
    """The units the sequencer drives: ``stats`` (NormStats, vectors up to ``max_cols``),
    ``valu`` (the element ALU), ``scalars`` (BitLinearScalars) and ``core`` (TernaryCore)."""

    NAMES = ("stats", "valu", "scalars", "core")

    def __init__(self, hw: HardwareConfig):
        self.stats = NormStats(hw.max_cols)
        self.valu = VALU(tag_width=1)
        self.scalars = BitLinearScalars()
        self.core = TernaryCore(hw.lanes, hw.max_cols, serial=True)

    def items(self):
        return [(name, getattr(self, name)) for name in self.NAMES]


def _uses_scalars(sp: vc.SubPass) -> bool:
    """Whether a sub-pass needs BitLinearScalars' results (1/mvn, the rescale factor)."""
    return (sp.m in (MSrc.RECIP, MSrc.S)) or sp.shift == ShiftSrc.Z or sp.b == BSrc.RESCALE


def _microcode_rows():
    """(op, index, SubPass, is_last) for every sub-pass, plus ARGMAX as one comparator pass."""
    rows = []
    for name, passes in MICROCODE.items():
        for i, sp in enumerate(passes):
            rows.append((_OPS[name], i, sp, i == len(passes) - 1))
    rows.append((Op.ARGMAX, 0, vc.SubPass("argmax", x=Base.OP0, valu=False, dst=Dst.NONE), True))
    return rows


class Sequencer(wiring.Component):
    """Fetch, decode and execute the program of one token.

    Ports
    -----
    start : In(stream of StartBeat)
        Run one token; taken only while idle and ``model_ok``.
    done : Out(stream of DoneBeat)
        The token's result, held until taken.
    reset_state : In(1), ready_state : Out(1)
        A one-cycle strobe zeroes every layer's state; ``ready_state`` is low from the cycle
        after the strobe until that is done (``max_layers · max_d`` cycles; also after reset).
    model_ok : In(1)
    program_addr : In(range(weight_words)), program_length : In(16)
        From the image header. At most ``program_length`` (and ``program_words / 2``)
        instructions run; a token ends at the first HALT (an unknown opcode counts as HALT).
    running : Out(1)
        The sequencer owns the weight memory and scratch read port X (not idle).
    w_addr : Out, w_data : In(64)
        The weight memory's read port (registered read).
    x_addr, y_addr : Out, x_data, y_data : In(signed(16))
        The scratch memory's two read ports (registered reads).
    s_wr_en, s_wr_addr, s_wr_data : Out
        The scratch memory's write port.
    stats, valu, scalars, core
        The units (flipped signatures).

    Execution
    ---------
    Each instruction: fetch (2 weight words) and decode, then its sub-passes in order (a ROM
    built from ``MICROCODE`` gives each sub-pass's operand sources, VALU mode and
    destination). A sub-pass issues element ``j`` in cycle ``t0 + j`` (scratch X/Y, weight and
    state addresses); its operands are on the read ports one cycle later and go to NormStats or
    the ARGMAX comparator in that cycle, and through the operand register
    (``OPERAND_STAGES``) to the VALU; the VALU's results are written in order, straight to
    scratch, the state or the activation buffer. The next sub-pass starts when the last
    result is written (and, after a statistics pass, when the statistics, or for BITLINEAR the
    scalars, are ready: always after ``BitLinearScalars.max_cycles``, so that costs depend on
    operands only). BITLINEAR's core phase starts ``OPERAND_STAGES + VALU.latency + 2``
    cycles into the "act" pass (each column after its activation is written) and feeds the
    ternary core one column per cycle, groups ``max(cols, lanes + 1)`` cycles apart, so that a
    group's sums (shifted out of the core one per cycle into the VALU: the "drain" sub-pass,
    the padding rows of a partial group flushed) never stall it.
    ``firmware.interpreter.CostModel`` is the cycle count of all this, exactly.
    """

    def __init__(self, hw: HardwareConfig, units: CoreUnits):
        if not isinstance(hw, HardwareConfig):
            raise ValueError(f"Sequencer needs a firmware.isa.HardwareConfig, not {hw!r}")
        self.hw = hw
        self.units = units
        self.layout = instruction_layout(hw)
        members = {
            "start": In(stream.Signature(StartBeat())),
            "done": Out(stream.Signature(DoneBeat())),
            "reset_state": In(1),
            "ready_state": Out(1),
            "model_ok": In(1),
            "program_addr": In(range(hw.weight_words)),
            "program_length": In(16),
            "running": Out(1),
            "w_addr": Out(range(hw.weight_words)),
            "w_data": In(WORD_BITS),
            "x_addr": Out(range(hw.scratch_words)),
            "y_addr": Out(range(hw.scratch_words)),
            "x_data": In(signed(16)),
            "y_data": In(signed(16)),
            "s_wr_en": Out(1),
            "s_wr_addr": Out(range(hw.scratch_words)),
            "s_wr_data": Out(signed(16)),
        }
        for name, unit in units.items():
            members[name] = In(unit.signature)
        super().__init__(members)
        #: high in the first cycle of every instruction fetch (tests and benches)
        self.fetching = Signal()

    def _field(self, insn, op: Op, name: str):
        for spec in self.layout[op]:
            if spec.name == name:
                v = insn[spec.lsb:spec.lsb + spec.width]
                return v.as_signed() if spec.signed else v
        raise KeyError(f"{op.name} has no field {name}")

    def elaborate(self, platform):
        m = Module()
        hw = self.hw
        lanes = hw.lanes
        F = self._field
        stats, valu, scalars, core = (getattr(self, n) for n in CoreUnits.NAMES)
        max_len = max(hw.max_cols, hw.max_rows, hw.max_vocab)
        insn_bits = max([4] + [s.lsb + s.width for specs in self.layout.values() for s in specs])
        cols_per_word = WORD_BITS // (2 * lanes)
        tslot_bits = max((cols_per_word - 1).bit_length(), 0)

        # ================================================================ control state
        insn = Signal(insn_bits)
        op = Signal(4)
        token = Signal(16)
        pc = Signal(range(hw.weight_words))
        max_insns = hw.program_words // 2
        insn_left = Signal(range(max_insns + 1))
        next_token = Signal(16)
        cycles = Signal(COUNTER_BITS)
        busy = Signal(COUNTER_BITS)
        counting = Signal()
        with m.If(counting):
            m.d.sync += cycles.eq(cycles + 1)
        is_op = {o: (op == int(o)) for o in Op}

        # ================================================================ microcode ROM
        rows = _microcode_rows()
        step = Signal(3)                     # sub-pass index within the instruction
        assert all(i < 8 for _, i, _, _ in rows), "a macro-op has more sub-passes than step counts"
        ctl = {k: Signal(w, name=f"uc_{k}") for k, w in (
            ("x", 3), ("y", 3), ("w", 2), ("a", 3), ("b", 2), ("m", 4), ("c", 2), ("shift", 3),
            ("shift_const", 6), ("mode", 2), ("out", 1), ("dst", 2), ("dst_base", 3),
            ("reduce", 2), ("cond_lb", 1), ("valu", 1), ("drain", 1), ("last", 1),
            ("argmax", 1), ("scalars", 1))}
        with m.Switch(Cat(step, op)):
            for o, i, sp, last in rows:
                with m.Case(i | (int(o) << 3)):
                    vals = {"x": sp.x, "y": sp.y, "w": sp.w, "a": sp.a, "b": sp.b, "m": sp.m,
                            "c": sp.c, "shift": sp.shift, "shift_const": sp.shift_const,
                            "mode": sp.mode, "out": sp.out, "dst": sp.dst,
                            "dst_base": sp.dst_base, "reduce": sp.reduce,
                            "cond_lb": sp.cond_lb, "valu": sp.valu,
                            "drain": sp.name == "drain", "last": last,
                            "argmax": o == Op.ARGMAX, "scalars": _uses_scalars(sp)}
                    m.d.comb += [ctl[k].eq(int(v)) for k, v in vals.items() if int(v)]

        # ================================================================ decoded operands
        op0, op1, op2, dstb = (Signal(range(hw.scratch_words), name=n)
                               for n in ("op0", "op1", "op2", "dstb"))
        n_el = Signal(range(max_len + 1))            # elements of the instruction's passes
        rows_n = Signal(range(hw.max_rows + 1))
        waddr = Signal(range(hw.weight_words))       # the weight vector's first word
        op_shift = Signal(signed(7))
        layer = Signal(range(hw.max_layers))
        has_lb = Signal()

        def base_addr(sel):
            temps = {Base.T1: hw.temp_base(1), Base.T2: hw.temp_base(2), Base.T3: hw.temp_base(3)}
            return Mux(sel == Base.OP0, op0, Mux(sel == Base.OP1, op1, Mux(
                sel == Base.OP2, op2, Mux(sel == Base.DST, dstb, Mux(
                    sel == Base.T1, temps[Base.T1], Mux(sel == Base.T2, temps[Base.T2],
                                                        temps[Base.T3]))))))

        # ================================================================ registers the passes use
        mant_r = Signal(16)
        e_r = Signal(6)
        scale_r = Signal(16)
        sc = {k: Signal(w, name=f"sc_{k}") for k, w in (
            ("qm", 16), ("qs", 5), ("recip", 16), ("s", 16), ("zs", 6), ("zb", 2))}

        # ================================================================ pass engine
        p_run = Signal()                 # issuing elements
        p_j = Signal(range(max_len + 1))
        p_n = Signal(range(max_len + 1))
        xb = Signal(range(hw.scratch_words))
        yb = Signal(range(hw.scratch_words))
        m.d.comb += [self.x_addr.eq(xb + p_j), self.y_addr.eq(yb + p_j)]
        issue = Signal()
        m.d.comb += issue.eq(p_run & (p_j != p_n))
        d_valid = Signal()               # operands of an element are on the read ports
        d_last = Signal()
        d_j = Signal(range(max_len))
        m.d.sync += [d_valid.eq(issue), d_last.eq(issue & (p_j + 1 == p_n)), d_j.eq(p_j)]
        with m.If(issue):
            m.d.sync += p_j.eq(p_j + 1)

        # weight stream: element j of a W16 vector is slot j % 4 of word waddr + j // 4; of a
        # W8 row byte j % 8 of word waddr + j // 8
        w_pass_addr = Mux(ctl["w"] == WKind.W8, waddr + (p_j >> 3), waddr + (p_j >> 2))
        wslot_d = Signal(3)
        scale_addr = Signal()                  # EMBED: the row scale's word is read
        m.d.sync += wslot_d.eq(Mux(scale_addr, token[:2], p_j[:3]))
        w16 = Signal(16)
        m.d.comb += w16.eq(self.w_data.word_select(wslot_d[:2], 16))
        w8 = Signal(signed(8))
        m.d.comb += w8.eq(self.w_data.word_select(wslot_d, 8))

        # state memory (MLGRU h, max_layers x max_d int16)
        m.submodules.state = state = memory.Memory(shape=signed(16), depth=hw.max_layers * hw.max_d,
                                                   init=[])
        st_rd = state.read_port()
        st_wr = state.write_port()
        layer_base = Signal(range(hw.max_layers * hw.max_d))      # layer · max_d
        with m.Switch(layer):
            for k in range(hw.max_layers):
                with m.Case(k):
                    m.d.comb += layer_base.eq(k * hw.max_d)
        m.d.comb += st_rd.addr.eq(layer_base + p_j)
        h = st_rd.data

        # activation buffer (BITLINEAR's int8 activations)
        m.submodules.act_buf = act_buf = memory.Memory(shape=signed(8), depth=hw.max_cols, init=[])
        act_rd = act_buf.read_port()
        act_wr = act_buf.write_port()

        # BITLINEAR's drain takes the core's sums one per cycle, straight into the VALU
        in_core_phase = Signal()
        drain_left = Signal(range(hw.max_rows + 1))
        drain_take = Signal()
        m.d.comb += drain_take.eq(core.o_stream.valid & in_core_phase & (drain_left != 0))

        x, y = self.x_data, self.y_data
        valu_in = valu.i_stream
        a_val = Signal(signed(vc.A_BITS))
        with m.Switch(ctl["a"]):
            with m.Case(ASrc.X):
                m.d.comb += a_val.eq(x)
            with m.Case(ASrc.W):
                m.d.comb += a_val.eq(Mux(ctl["w"] == WKind.W8, w8, w16.as_signed()))
            with m.Case(ASrc.H):
                m.d.comb += a_val.eq(h)
            with m.Case(ASrc.ACC):
                m.d.comb += a_val.eq(core.o_stream.payload)
            with m.Case(ASrc.H_MINUS_X):
                m.d.comb += a_val.eq(h - x)
            with m.Case(ASrc.Q15_MINUS_W):
                m.d.comb += a_val.eq(C(1 << 15, 17) - w16)
        b_val = Signal(signed(vc.B_BITS))
        with m.Switch(ctl["b"]):
            with m.Case(BSrc.ONE):
                m.d.comb += b_val.eq(1)
            with m.Case(BSrc.W):
                m.d.comb += b_val.eq(w16.as_signed())
            with m.Case(BSrc.Y):
                m.d.comb += b_val.eq(y)
            with m.Case(BSrc.RESCALE):
                m.d.comb += b_val.eq(sc["zb"])
        m_val = Signal(vc.M_BITS)
        opm = Signal(16)
        m.d.comb += opm.eq(Mux(op_shift < 0, C(1, 16) << (-op_shift)[:3], 1))
        with m.Switch(ctl["m"]):
            for sel, v in ((MSrc.ONE, 1), (MSrc.X, x.as_unsigned()), (MSrc.Y, y.as_unsigned()),
                           (MSrc.MANT, mant_r), (MSrc.SCALE, scale_r), (MSrc.QM, sc["qm"]),
                           (MSrc.RECIP, sc["recip"]), (MSrc.S, sc["s"]), (MSrc.OPM, opm)):
                with m.Case(sel):
                    m.d.comb += m_val.eq(v)
        c_val = Signal(signed(vc.C_BITS))
        with m.Switch(ctl["c"]):
            with m.Case(CSrc.X):
                m.d.comb += c_val.eq(x)
            with m.Case(CSrc.Y):
                m.d.comb += c_val.eq(y)
            with m.Case(CSrc.W):
                m.d.comb += c_val.eq(w16)
        s_val = Signal(vc.S_BITS)
        norm_shift = Signal(signed(8))
        m.d.comb += norm_shift.eq(e_r + F(insn, Op.NORM, "frac_diff"))
        with m.Switch(ctl["shift"]):
            with m.Case(ShiftSrc.CONST):
                m.d.comb += s_val.eq(ctl["shift_const"])
            with m.Case(ShiftSrc.OP):
                m.d.comb += s_val.eq(Mux(op_shift < 0, 0, op_shift[:6]))
            with m.Case(ShiftSrc.NORM):
                m.d.comb += s_val.eq(norm_shift[:6])
            with m.Case(ShiftSrc.QS):
                m.d.comb += s_val.eq(sc["qs"])
            with m.Case(ShiftSrc.Z):
                m.d.comb += s_val.eq(sc["zs"])

        # the operand register: memory read data and the operand selection above take most
        # of a 24 MHz cycle (the SPRAM's clock-to-out alone is ~2 ns plus routing), so the
        # VALU takes its beat one cycle later from registers (OPERAND_STAGES)
        feed_start = self.units.valu.latency + OPERAND_STAGES + 2     # cycles into the act pass
        pass_t = Signal(range(feed_start + 1))
        m.d.sync += [
            valu_in.p.a.eq(a_val), valu_in.p.b.eq(b_val), valu_in.p.m.eq(m_val),
            valu_in.p.c.eq(c_val), valu_in.p.s.eq(s_val), valu_in.p.mode.eq(ctl["mode"]),
            valu_in.p.out.eq(ctl["out"]),
            valu_in.valid.eq(Mux(ctl["drain"], drain_take, d_valid & ctl["valu"])),
        ]
        m.d.comb += [valu_in.p.tag.eq(0), valu.o_stream.ready.eq(1)]

        # NormStats: STATS / STATS_ABSMAX passes
        stats_pass = (ctl["reduce"] == Reduce.STATS) | (ctl["reduce"] == Reduce.STATS_ABSMAX)
        m.d.comb += [
            stats.i_stream.valid.eq(d_valid & stats_pass),
            stats.i_stream.p.x.eq(x), stats.i_stream.p.last.eq(d_last),
            stats.eps_q.eq(Mux(is_op[Op.NORM], F(insn, Op.NORM, "eps_q"),
                               F(insn, Op.BITLINEAR, "eps_q"))),
        ]

        # ARGMAX comparator
        best = Signal(signed(16))
        best_idx = Signal(16)
        with m.If(d_valid & ctl["argmax"]):
            with m.If((d_j == 0) | (x > best)):
                m.d.sync += [best.eq(x), best_idx.eq(d_j)]

        # results: written in order to scratch, state or the activation buffer
        out_j = Signal(range(max_len + 1))
        res_v = valu.o_stream.valid
        res_y = valu.o_stream.p.y
        dst_base_addr = Signal(range(hw.scratch_words))
        m.d.comb += [self.s_wr_en.eq(res_v & (ctl["dst"] == Dst.SCRATCH)),
                     self.s_wr_addr.eq(dst_base_addr + out_j), self.s_wr_data.eq(res_y)]
        m.d.comb += [
            st_wr.en.eq(res_v & (ctl["dst"] == Dst.STATE)),
            st_wr.addr.eq(layer_base + out_j), st_wr.data.eq(res_y),
            act_wr.en.eq(res_v & (ctl["dst"] == Dst.ACT)),
            act_wr.addr.eq(out_j), act_wr.data.eq(res_y[:8]),
        ]
        with m.If(res_v):
            m.d.sync += out_j.eq(out_j + 1)

        # ================================================================ BITLINEAR core phase
        cols = Signal(range(hw.max_cols + 1))
        group_period = Signal(range(max(hw.max_cols, lanes + 1) + 1))
        f_j = Signal.like(group_period)
        feed_rows = Signal(range(hw.max_rows + lanes))      # rows not yet fed
        feeding = Signal()
        tword = Signal(range(hw.weight_words))
        tslot = Signal(max(tslot_bits, 1))
        col_issue = Signal()
        m.d.comb += col_issue.eq(feeding & (f_j < cols))
        m.d.comb += act_rd.addr.eq(f_j)
        beat_v = Signal()
        beat_first = Signal()
        beat_last = Signal()
        tslot_d = Signal.like(tslot)
        m.d.sync += [beat_v.eq(col_issue), beat_first.eq(f_j == 0), beat_last.eq(f_j + 1 == cols),
                     tslot_d.eq(tslot)]
        trits = Signal(2 * lanes)
        if cols_per_word > 1:
            m.d.comb += trits.eq(self.w_data.word_select(tslot_d[:tslot_bits], 2 * lanes))
        else:
            m.d.comb += trits.eq(self.w_data)
        with m.If(feeding):
            with m.If(col_issue):
                if cols_per_word > 1:
                    m.d.sync += tslot.eq(tslot + 1)
                    with m.If(tslot == cols_per_word - 1):
                        m.d.sync += tword.eq(tword + 1)
                else:
                    m.d.sync += tword.eq(tword + 1)
            with m.If(f_j + 1 == group_period):
                m.d.sync += [f_j.eq(0), feed_rows.eq(feed_rows - lanes)]
                with m.If(feed_rows <= lanes):
                    m.d.sync += feeding.eq(0)
            with m.Else():
                m.d.sync += f_j.eq(f_j + 1)
        m.d.comb += [
            core.i_stream.valid.eq(beat_v),
            core.i_stream.p.trits.eq(trits),
            core.i_stream.p.act.eq(act_rd.data),
            core.i_stream.p.first.eq(beat_first),
            core.i_stream.p.last.eq(beat_last),
        ]
        with m.If(core.i_stream.valid & core.i_stream.ready & counting):
            m.d.sync += busy.eq(busy + 1)

        # drain: the group's sums one per cycle into the VALU (the core's output shifts); the
        # padding rows of a partial last group are flushed
        m.d.comb += [core.o_stream.ready.eq(drain_take),
                     core.flush.eq(drain_take & (drain_left == 1))]
        with m.If(drain_take):
            m.d.sync += drain_left.eq(drain_left - 1)

        # ================================================================ state reset
        rs_pending = Signal(init=1)
        rs_addr = Signal(range(hw.max_layers * hw.max_d))
        with m.If(self.reset_state):
            m.d.sync += [rs_pending.eq(1), rs_addr.eq(0)]
        with m.Elif(rs_pending):
            m.d.sync += rs_addr.eq(rs_addr + 1)
            with m.If(rs_addr == hw.max_layers * hw.max_d - 1):
                m.d.sync += rs_pending.eq(0)
        m.d.comb += self.ready_state.eq(~rs_pending)
        with m.If(rs_pending):
            m.d.comb += [st_wr.en.eq(1), st_wr.addr.eq(rs_addr), st_wr.data.eq(0)]

        # ================================================================ main FSM
        m.d.comb += [self.done.p.next_token.eq(next_token), self.done.p.cycles.eq(cycles),
                     self.done.p.busy.eq(busy)]
        fetch_addr = Signal()
        m.d.comb += self.w_addr.eq(Mux(fetch_addr, pc, Mux(
            scale_addr, F(insn, Op.EMBED, "scale_addr") + token[2:],
            Mux(in_core_phase, tword, w_pass_addr))))

        # decode: the instruction's operands into registers
        def decode(m):
            new_op = insn[:4]
            fields = {
                Op.EMBED: {"dst": dstb, "n": n_el},
                Op.NORM: {"dst": dstb, "src": op0, "n": n_el, "w_addr": waddr},
                Op.BITLINEAR: {"dst": dstb, "src": op0, "cols": n_el, "rows": rows_n,
                               "g_addr": waddr},
                Op.MLGRU: {"dst": dstb, "i_src": op0, "f_src": op1, "gn_src": op2, "n": n_el,
                           "layer": layer, "has_lb": has_lb, "lb_addr": waddr},
                Op.GLU: {"dst": dstb, "gate_src": op0, "up_src": op1, "n": n_el},
                Op.RESADD: {"dst": dstb, "src": op0, "n": n_el},
                Op.ARGMAX: {"src": op0, "n": n_el},
            }
            with m.Switch(new_op):
                for o, fl in fields.items():
                    with m.Case(o):
                        for name, reg in fl.items():
                            m.d.sync += reg.eq(F(insn, o, name))
                        if o == Op.EMBED:
                            m.d.sync += op_shift.eq(F(insn, o, "emb_shift"))
                        if o == Op.RESADD:
                            m.d.sync += op_shift.eq(F(insn, o, "shift"))
                        if o == Op.GLU:
                            m.d.sync += op_shift.eq(2 * PRE_FRAC - F(insn, o, "u_frac"))
                        if o == Op.MLGRU:
                            m.d.sync += op_shift.eq(F(insn, o, "g_frac") + PRE_FRAC
                                                    - F(insn, o, "o_frac"))
                        if o == Op.BITLINEAR:
                            c = F(insn, o, "cols")
                            m.d.sync += [cols.eq(c),
                                         group_period.eq(Mux(c > lanes, c, lanes + 1)),
                                         tword.eq(F(insn, o, "trit_addr")), tslot.eq(0)]
            m.d.sync += [op.eq(new_op), step.eq(0)]

        # EMBED: the row's word offset token · ceil(n / 8) and the row scale
        emb_rw = (F(insn, Op.EMBED, "n") + 7) >> 3
        emb_off = Signal(range(hw.weight_words))
        tok = token[:max(hw.max_vocab - 1, 1).bit_length()]
        m.d.sync += emb_off.eq(tok * emb_rw)

        # sub-pass start: bases and counts from the ROM
        def start_pass(m):
            m.d.sync += [p_run.eq(1), p_j.eq(0), out_j.eq(0),
                         p_n.eq(Mux(ctl["drain"], 0, n_el)),
                         xb.eq(base_addr(ctl["x"])), yb.eq(base_addr(ctl["y"])),
                         dst_base_addr.eq(base_addr(ctl["dst_base"]))]

        stats_done = Signal()
        scalars_done = Signal()
        # BITLINEAR: max|x·g| is final when the stats_absmax pass ends; the normalize pass needs
        # only sh = bitlen(mv) - 15 (qm = 2**-sh for sh < 0, qs = max(sh, 0)), computed here,
        # so it runs while NormStats and then BitLinearScalars work on (mv is held for them:
        # the normalize pass's products move the VALU's absmax)
        mv_r = Signal(31)
        absmax_ok = Signal()
        # two register stages from mv_r to qm/qs (a priority encoder, then a shift): mv_r is
        # taken in the stats_absmax pass's last cycle T and the normalize pass's first operands
        # enter the operand register in T + 3
        mv_bits = bit_length(m, mv_r, "mv_bits")
        sh_r = Signal(signed(7))
        m.d.sync += [
            sh_r.eq(Mux(mv_r == 0, 0, mv_bits - QUANT_BITS)),
            sc["qs"].eq(Mux(sh_r < 0, 0, sh_r[:5])),
            sc["qm"].eq(Mux(sh_r < 0, C(1, 16) << (-sh_r)[:4], 1)),
        ]
        m.d.comb += [stats.o_stream.ready.eq(1), scalars.o_stream.ready.eq(1)]
        with m.If(stats.o_stream.valid):
            m.d.sync += [mant_r.eq(stats.o_stream.p.mant), e_r.eq(stats.o_stream.p.e),
                         stats_done.eq(1)]
        # the scalars unit's result is used exactly max_cycles after the request (its worst
        # case), so that every BITLINEAR of a program takes the same cycles for any data
        sc_got = Signal()
        sc_wait = Signal(range(self.units.scalars.max_cycles + 1))
        with m.If(scalars.o_stream.valid):
            m.d.sync += [sc[k].eq(scalars.o_stream.p[k]) for k in ("recip", "s", "zs", "zb")]
            m.d.sync += sc_got.eq(1)
        with m.If(sc_wait != 0):
            m.d.sync += sc_wait.eq(sc_wait - 1)
        m.d.comb += scalars_done.eq(sc_got & (sc_wait == 0))
        m.d.comb += [
            scalars.i_stream.p.mv.eq(mv_r), scalars.i_stream.p.mant.eq(mant_r),
            scalars.i_stream.p.e.eq(e_r),
            scalars.i_stream.p.gamma_mant.eq(F(insn, Op.BITLINEAR, "gamma_mant")),
            scalars.i_stream.p.scale_exp.eq(F(insn, Op.BITLINEAR, "scale_exp")),
        ]
        valu_idle = ~valu.busy & ~valu_in.valid
        issued_all = ~p_run | (p_j == p_n)
        wait_scalars = Signal()
        # BITLINEAR: (mv, mant, e) into the scalars unit as soon as the statistics are ready,
        # while the normalize pass runs; the act pass starts when the results are
        with m.If(is_op[Op.BITLINEAR] & stats_done & absmax_ok & ~wait_scalars):
            m.d.comb += scalars.i_stream.valid.eq(1)
            with m.If(scalars.i_stream.ready):
                m.d.sync += [wait_scalars.eq(1), sc_wait.eq(self.units.scalars.max_cycles)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                m.d.comb += self.start.ready.eq(self.model_ok & ~rs_pending)
                with m.If(self.start.valid & self.model_ok & ~rs_pending):
                    m.d.sync += [token.eq(self.start.p.token), pc.eq(self.program_addr),
                                 insn_left.eq(Mux(self.program_length > max_insns, max_insns,
                                                  self.program_length)),
                                 next_token.eq(0), cycles.eq(0), busy.eq(0), counting.eq(1)]
                    m.next = "FETCH0"
            with m.State("FETCH0"):
                m.d.comb += [fetch_addr.eq(1), self.fetching.eq(1)]
                m.d.sync += pc.eq(pc + 1)
                m.next = "FETCH1"
            with m.State("FETCH1"):
                m.d.comb += fetch_addr.eq(1)
                m.d.sync += [pc.eq(pc + 1), insn[:min(WORD_BITS, insn_bits)].eq(self.w_data)]
                m.next = "FETCH2"
            with m.State("FETCH2"):
                if insn_bits > WORD_BITS:
                    m.d.sync += insn[WORD_BITS:].eq(self.w_data)
                m.next = "DECODE"
            with m.State("DECODE"):
                with m.If((insn[:4] == Op.HALT) | (insn[:4] > max(Op)) | (insn_left == 0)):
                    m.d.sync += counting.eq(0)
                    m.next = "DONE"
                with m.Else():
                    m.d.sync += insn_left.eq(insn_left - 1)
                    decode(m)
                    with m.If(insn[:4] == Op.EMBED):
                        m.next = "EMBED_SCALE"
                    with m.Else():
                        m.next = "PASS_START"
            with m.State("EMBED_SCALE"):
                # the row scale: uint16 element `token` of the vector at scale_addr; the row's
                # first word is table_addr + token · ceil(n / 8) (emb_off, registered)
                m.d.comb += scale_addr.eq(1)
                m.d.sync += waddr.eq(F(insn, Op.EMBED, "table_addr") + emb_off)
                m.next = "EMBED_SCALE1"
            with m.State("EMBED_SCALE1"):
                m.d.sync += scale_r.eq(w16)
                m.next = "PASS_START"
            with m.State("PASS_START"):
                with m.If(ctl["cond_lb"] & ~has_lb):
                    m.d.sync += step.eq(step + 1)
                with m.Elif(ctl["scalars"] & ~(wait_scalars & scalars_done)):
                    pass                        # 1/mvn and the rescale factor are not ready yet
                with m.Else():
                    start_pass(m)
                    with m.If(ctl["reduce"] != Reduce.NONE):     # a new statistics pass
                        m.d.sync += [stats_done.eq(0), sc_got.eq(0), wait_scalars.eq(0),
                                     absmax_ok.eq(0)]
                    m.d.comb += valu.absmax_clear.eq(ctl["reduce"] == Reduce.STATS_ABSMAX)
                    with m.If(ctl["drain"]):
                        m.d.sync += drain_left.eq(rows_n)
                    m.d.sync += pass_t.eq(0)
                    m.next = "PASS"
            with m.State("PASS"):
                with m.If(pass_t != feed_start):
                    m.d.sync += pass_t.eq(pass_t + 1)
                # BITLINEAR: the core starts on row group 0 while the "act" pass still writes
                # the activations, feed_start cycles behind it (column j is read after the
                # VALU wrote it); group 0's sums reach the VALU only after that pass's last
                with m.If((ctl["dst"] == Dst.ACT) & (pass_t == feed_start - 1)):
                    m.d.sync += [in_core_phase.eq(1), feeding.eq(1), f_j.eq(0),
                                 feed_rows.eq(rows_n)]
                with m.If(issue & (p_j + 1 == p_n)):
                    m.d.sync += p_run.eq(0)
                done_elems = Signal()
                m.d.comb += done_elems.eq(Mux(
                    ctl["drain"], ~feeding & (drain_left == 0) & valu_idle,
                    issued_all & ~d_valid & valu_idle))
                # NORM waits for its statistics; BITLINEAR's stats_absmax pass only for max|x·g|
                need_stats = ctl["reduce"] == Reduce.STATS
                ready = done_elems & (~need_stats | stats_done)
                with m.If(ready & (ctl["reduce"] == Reduce.STATS_ABSMAX)):
                    m.d.sync += [mv_r.eq(valu.absmax), absmax_ok.eq(1)]
                with m.If(ready):
                    with m.If(ctl["drain"]):
                        m.d.sync += in_core_phase.eq(0)
                    with m.If(ctl["argmax"]):
                        m.d.sync += next_token.eq(best_idx)
                    with m.If(ctl["last"]):
                        m.next = "FETCH0"
                    with m.Else():
                        m.d.sync += step.eq(step + 1)
                        m.next = "PASS_START"
            with m.State("DONE"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    m.next = "IDLE"
        m.d.comb += self.running.eq(~fsm.ongoing("IDLE") & ~fsm.ongoing("DONE"))
        return m
