"""The sequencer: fetches the per-token program from the weight memory, decodes it with
``firmware.isa.instruction_layout`` and runs each macro-op by streaming scratch and weight
memory data through the datapath units, one instruction at a time.

docs/isa.md is the instruction set; ``firmware.interpreter.Interpreter`` is the behavioural
specification this gateware matches bit for bit, and ``firmware.interpreter.CostModel`` the
cycle count it matches (see :class:`Sequencer`, "Timing", for the documented differences).
"""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from mmfree.firmware.isa import WORD_BITS, HardwareConfig, Op, instruction_layout
from mmfree.hdl.activation import GLU
from mmfree.hdl.mlgru import MLGRU
from mmfree.hdl.quantizer import Quantizer
from mmfree.hdl.rescale import FACTOR_CYCLES_MAX, Rescale
from mmfree.hdl.rmsnorm import NormApply, NormStats
from mmfree.hdl.ternary_core import TernaryCore

__all__ = ["StartBeat", "DoneBeat", "CoreUnits", "Sequencer", "program_cycles"]


def program_cycles(program, hw: HardwareConfig) -> list[tuple[int, int]]:
    """``(cycles, core_busy)`` of each instruction of ``program`` (up to its first HALT) on
    this sequencer: ``firmware.interpreter.CostModel`` plus the differences that
    :class:`Sequencer` documents (EMBED's multiply on NormApply; TernaryCore's one idle cycle
    between groups when ``cols <= lanes``; the MLGRU unit's phase). A token takes their sum.

    The MLGRU term: a token's first fetch is the cycle after a cycle ``p0`` in which the MLGRU
    unit takes elements (its phase 0, every third cycle), so an MLGRU instruction fetched ``T``
    cycles into the token has its first element ready at ``p0 + T + 8`` (fetch 4, three reads)
    and waits ``-(T + 8) mod 3 = (1 - T) mod 3`` cycles for the next phase-0 cycle."""
    from mmfree.firmware.interpreter import CostModel
    from mmfree.firmware.isa import MLGRU as MLGRUInsn, BitLinear, Embed, Halt

    cm = CostModel.for_hw(hw)
    out, t = [], 0
    for insn in program:
        cycles, busy = cm.cost(insn)
        if isinstance(insn, Embed):
            cycles += NormApply.latency - cm.elem
        elif isinstance(insn, BitLinear):
            groups = -(-insn.rows // hw.lanes)
            cycles += (groups - 1) * max(0, hw.lanes + 1 - max(insn.cols, hw.lanes))
        elif isinstance(insn, MLGRUInsn):
            cycles += (1 - t) % MLGRU.II
        out.append((cycles, busy))
        t += cycles
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
    """One of each datapath unit, sized for ``hw``; the sequencer reuses them across macro-ops.

    ``stats`` (NormStats, vectors up to ``max_cols``: NORM and BITLINEAR), ``apply``
    (NormApply: NORM's second pass and EMBED's multiply), ``quant`` (Quantizer, ``max_cols``),
    ``core`` (TernaryCore, ``lanes`` lanes, rows up to ``max_cols`` columns), ``rescale``
    (Rescale for the core's accumulators), ``mlgru`` (MLGRU, state for ``max_layers`` x
    ``max_d``), ``glu`` (GLU)."""

    NAMES = ("stats", "apply", "quant", "core", "rescale", "mlgru", "glu")

    def __init__(self, hw: HardwareConfig):
        self.stats = NormStats(hw.max_cols)
        self.apply = NormApply()
        self.quant = Quantizer(hw.max_cols)
        self.core = TernaryCore(hw.lanes, hw.max_cols)
        self.rescale = Rescale(self.core.acc_width)
        self.mlgru = MLGRU(hw.max_d, hw.max_layers)
        self.glu = GLU()

    def items(self):
        return [(name, getattr(self, name)) for name in self.NAMES]


# weight-stream element kinds: int16/uint16 vectors, int8 bytes, trit columns
_W16, _W8, _WT = 0, 1, 2


class Sequencer(wiring.Component):
    """Fetch, decode and execute the program of one token.

    Parameters
    ----------
    hw : HardwareConfig
    units : CoreUnits
        The units it drives; each is a port of the sequencer with the unit's signature flipped
        (``wiring.connect(m, seq.<name>, units.<name>)``).

    Ports
    -----
    start : In(stream of StartBeat)
        Run one token. Taken only while idle and ``model_ok``.
    done : Out(stream of DoneBeat)
        The token's result, held until taken; the sequencer is idle again after the transfer.
    reset_state : In(1), ready_state : Out(1)
        A one-cycle strobe zeroes every layer's state (the MLGRU unit's memory);
        ``ready_state`` is low from the cycle after the strobe until the state is zero (and
        after reset, while the MLGRU unit clears its memory).
    model_ok : In(1)
    program_addr : In(range(weight_words)), program_length : In(16)
        From the image header: the first instruction's word and the instruction count. At most
        ``program_length`` instructions run (and at most ``program_words / 2``); the token ends
        at the first HALT (an unknown opcode counts as HALT).
    running : Out(1)
        The sequencer owns the weight memory and the scratch read port (not idle).
    w_addr : Out(range(weight_words)), w_data : In(64)
        The weight memory's read port (registered read).
    s_rd_addr, s_rd_en : Out, s_rd_data : In(signed(16))
        The scratch memory's read port (``s_rd_en`` low holds the read data).
    s_wr_en, s_wr_addr, s_wr_data : Out
        The scratch memory's write port.
    stats, apply, quant, core, rescale, mlgru, glu
        The units (flipped signatures).
    fault : Out(1)
        Sticky: a unit was offered an element it could not take where the schedule guarantees
        it can (a bug, never expected; for tests).

    Execution (docs/isa.md)
    ---------
    Each instruction: fetch (2 weight words) and decode, then its body; the next fetch starts
    when the body's last result has been written to scratch. Body ``t = 0`` is the cycle after
    decode. A *pass* reads k scratch vectors element by element (k = 1..3 reads per element,
    one per cycle, on the single read port) together with an optional weight-memory vector,
    and offers each element to a unit in the cycle its last read arrives; results stream back
    into scratch through one write register (``dst``, ``dst + 1``, ...).

    * EMBED: ``t = 0`` reads the row scale; the row's int8 elements (weight memory) go through
      NormApply with ``w = 1``, ``mant = scale``, ``shift = emb_shift``, which is
      ``arith.embed`` exactly.
    * NORM: pass 1 into NormStats; its result (captured) gives NormApply's ``mant`` and
      ``shift = e + frac_diff``; one cycle later pass 2 (``src`` and ``w``) into NormApply.
    * BITLINEAR: one pass of ``src`` and ``g`` into NormStats and Quantizer at once. The
      activations fill the activation buffer (``max_cols`` int8). The statistics and the
      quantizer's ``mvn``, ``sh`` form Rescale's parameter beat. Row groups: the columns of
      group k (activation buffer + trit words) stream into TernaryCore, back to back; each
      group's sums leave through an N:1 selector and a register into Rescale while the next
      group accumulates; Rescale's outputs are the destination rows.
    * MLGRU (3 reads per element, lower bound from weight memory), GLU (2), RESADD (2, own
      3-stage pipeline: shift, round and add, saturate), ARGMAX (1, compare and keep the
      first maximum; ``next_token`` one cycle after the pass).

    Timing (cycles; F = 4: fetch and decode)
    ------
    Per instruction the cycles equal ``firmware.interpreter.CostModel`` except:

    * EMBED: its multiply is NormApply (latency 8) instead of a 3-stage pipeline: ``Le`` = 8.
    * BITLINEAR: group k+1's sums can be emitted by TernaryCore only the cycle after group k's
      output register has been read to the end, so groups follow each other every
      ``max(cols, lanes + 1)`` cycles (the model: ``max(cols, lanes)``); the difference is
      ``(G - 1) · (lanes + 1 - max(cols, lanes))`` when ``cols <= lanes``, 0 otherwise.
      The rescale factor is waited for at its worst case (``FACTOR_CYCLES_MAX``), as the model
      assumes: the first group's sums enter Rescale no earlier than ``FACTOR_CYCLES_MAX``
      cycles after the parameter beat, so costs depend on operands only.
    * MLGRU: the unit takes an element only in one cycle of its free-running 3-cycle phase; the
      first element waits 0..2 cycles for it (the rest follow in lock step). Since every token
      starts aligned to that phase (``start`` waits for it, uncounted), the wait of each MLGRU
      instruction is fixed for a program: each token of a model takes the same cycles.

    :func:`program_cycles` gives every instruction's cycles with these terms.
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
            "s_rd_addr": Out(range(hw.scratch_words)),
            "s_rd_en": Out(1),
            "s_rd_data": In(signed(16)),
            "s_wr_en": Out(1),
            "s_wr_addr": Out(range(hw.scratch_words)),
            "s_wr_data": Out(signed(16)),
            "fault": Out(1),
        }
        for name, unit in units.items():
            members[name] = In(unit.signature)
        super().__init__(members)
        #: high in the first cycle of every instruction fetch (for tests and benches: the
        #: cycles between two of them are the instruction's cost)
        self.fetching = Signal()

    # ------------------------------------------------------------------ helpers

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
        stats, apply, quant, core, rescale, mlgru, glu = (getattr(self, n) for n in CoreUnits.NAMES)

        max_len = max(hw.max_cols, hw.max_rows, hw.max_vocab, hw.max_inter, hw.max_d)
        insn_bits = max([4] + [s.lsb + s.width for specs in self.layout.values() for s in specs])
        lane_bits = (lanes - 1).bit_length()
        cols_per_word = WORD_BITS // (2 * lanes)              # trit columns in a weight word
        tslot_bits = max((cols_per_word - 1).bit_length(), 0)
        wslot_bits = max(3, tslot_bits)

        # ================================================================ control state
        insn = Signal(insn_bits)
        op = Signal(4)
        token = Signal(16)
        pc = Signal(range(hw.weight_words))
        max_insns = hw.program_words // 2                # INSN_WORDS per instruction
        insn_left = Signal(range(max_insns + 1))
        next_token = Signal(16)
        cycles = Signal(32)
        busy = Signal(32)
        counting = Signal()
        fault = Signal()
        m.d.comb += self.fault.eq(fault)

        is_op = {o: (op == int(o)) for o in Op}

        # ================================================================ weight stream
        wptr = Signal(range(hw.weight_words))
        wslot = Signal(wslot_bits)
        wmode = Signal(2)
        wslot_d = Signal(wslot_bits)
        wmode_d = Signal(2)
        w_step = Signal()                 # advance to the next element of the weight stream
        fetch_addr = Signal()             # the fetch drives the weight address (pc)
        m.d.sync += [wslot_d.eq(wslot), wmode_d.eq(wmode)]
        m.d.comb += self.w_addr.eq(Mux(fetch_addr, pc, wptr))
        wrap = Mux(wmode == _W16, 3, Mux(wmode == _W8, 7, cols_per_word - 1))
        with m.If(w_step):
            with m.If(wslot == wrap):
                m.d.sync += [wslot.eq(0), wptr.eq(wptr + 1)]
            with m.Else():
                m.d.sync += wslot.eq(wslot + 1)
        # element selection from the word read in the previous cycle
        idx16 = Mux(wmode_d == _W8, wslot_d[1:3], wslot_d[0:2])
        wsel16 = Signal(16)
        m.d.comb += wsel16.eq(self.w_data.word_select(idx16, 16))
        wbyte = Signal(signed(8))
        m.d.comb += wbyte.eq(Mux(wslot_d[0], wsel16[8:], wsel16[:8]))
        trits = Signal(2 * lanes)
        if cols_per_word > 1:
            m.d.comb += trits.eq(self.w_data.word_select(wslot_d[:tslot_bits], 2 * lanes))
        else:
            m.d.comb += trits.eq(self.w_data)

        # ================================================================ pass engine
        # Element j of a pass: k scratch reads (slots 0..k-1, bases b[slot] + j), one per cycle;
        # it is "pending" in the cycle its last read's data is on the read port, and leaves
        # when the target unit takes it (consume). Reads of the next element start only then.
        b = [Signal(range(hw.scratch_words), name=f"base{i}") for i in range(3)]
        p_active = Signal()
        p_j = Signal(range(max_len))
        p_slot = Signal(2)
        p_k1 = Signal(2)                   # reads per element - 1
        p_n = Signal(range(max_len + 1))   # elements
        pend = Signal()
        pend_last = Signal()
        pend_idx = Signal(range(max_len))
        hold0 = Signal(signed(16))
        hold1 = Signal(signed(16))
        tag_valid = Signal()
        tag_slot = Signal(2)
        target_ready = Signal()
        consume = Signal()
        issue = Signal()
        slot_last = Signal()
        m.d.comb += [
            consume.eq(pend & target_ready),
            issue.eq(p_active & (~pend | consume)),
            slot_last.eq(p_slot == p_k1),
        ]
        base = Mux(p_slot == 0, b[0], Mux(p_slot == 1, b[1], b[2]))
        m.d.comb += [self.s_rd_addr.eq(base + p_j), self.s_rd_en.eq(issue)]
        m.d.sync += [tag_valid.eq(issue & ~slot_last), tag_slot.eq(p_slot)]
        with m.If(tag_valid & (tag_slot == 0)):
            m.d.sync += hold0.eq(self.s_rd_data)
        with m.If(tag_valid & (tag_slot == 1)):
            m.d.sync += hold1.eq(self.s_rd_data)
        start_pass = Signal()              # (re)start a pass at j = 0 next cycle
        p_j_next = (p_j + 1)[:len(p_n)]
        with m.If(start_pass):
            m.d.sync += [p_active.eq(1), p_j.eq(0), p_slot.eq(0), pend.eq(0)]
        with m.Elif(issue):
            with m.If(slot_last):
                m.d.sync += [p_slot.eq(0), p_j.eq(p_j_next), pend.eq(1),
                             pend_last.eq(p_j_next == p_n), pend_idx.eq(p_j)]
                with m.If(p_j_next == p_n):
                    m.d.sync += p_active.eq(0)
            with m.Else():
                m.d.sync += [p_slot.eq(p_slot + 1), pend.eq(0)]
        with m.Elif(consume):
            m.d.sync += pend.eq(0)
        pass_done = ~p_active & ~pend
        col_issue = Signal()               # BITLINEAR: a trit column goes to the core
        m.d.comb += w_step.eq((issue & (p_slot == 0)) | col_issue)

        x = self.s_rd_data

        # ================================================================ result collector
        wr_en = Signal()
        wr_addr = Signal(range(hw.scratch_words))
        wr_data = Signal(signed(16))
        wr_last = Signal()
        wr_ptr = Signal(range(hw.scratch_words))
        out_left = Signal(range(max_len + 1))
        res_valid = Signal()
        res_data = Signal(signed(16))
        m.d.comb += [self.s_wr_en.eq(wr_en), self.s_wr_addr.eq(wr_addr), self.s_wr_data.eq(wr_data)]
        m.d.sync += wr_en.eq(res_valid)
        with m.If(res_valid):
            m.d.sync += [wr_addr.eq(wr_ptr), wr_data.eq(res_data), wr_ptr.eq(wr_ptr + 1),
                         wr_last.eq(out_left == 1), out_left.eq(out_left - 1)]
        body_written = wr_en & wr_last

        # ================================================================ shared per-op state
        phase = Signal()                   # NORM: apply pass; EMBED: row pass
        stats_ok = Signal()
        mant_r = Signal(16)
        e_r = Signal(6)
        m.d.comb += stats.o_stream.ready.eq(1)
        with m.If(stats.o_stream.valid):
            m.d.sync += [stats_ok.eq(1), mant_r.eq(stats.o_stream.p.mant), e_r.eq(stats.o_stream.p.e)]

        # ---------------------------------------------------------------- EMBED operands
        emb_scale = Signal(16)
        emb_cap = Signal()
        # token · ceil(n / 8) (the row's word offset) as two registered partial sums of
        # shift-and-add (no multiplier; two short adder trees instead of one long one)
        emb_row = [Signal(range(hw.weight_words), name=f"emb_row{i}") for i in range(2)]
        with m.If(emb_cap):
            m.d.sync += [emb_scale.eq(wsel16), emb_cap.eq(0)]

        # ---------------------------------------------------------------- NormStats / NormApply
        frac_diff = F(insn, Op.NORM, "frac_diff")
        m.d.comb += [
            stats.eps_q.eq(Mux(is_op[Op.NORM], F(insn, Op.NORM, "eps_q"), F(insn, Op.BITLINEAR, "eps_q"))),
            stats.i_stream.p.x.eq(x),
            stats.i_stream.p.last.eq(pend_last),
            apply.i_stream.p.x.eq(Mux(is_op[Op.EMBED], wbyte, x)),
            apply.i_stream.p.w.eq(Mux(is_op[Op.EMBED], 1, wsel16.as_signed())),
            apply.mant.eq(Mux(is_op[Op.EMBED], emb_scale, mant_r)),
            apply.shift.eq(Mux(is_op[Op.EMBED], F(insn, Op.EMBED, "emb_shift"),
                               (e_r + frac_diff)[:6])),
            apply.o_stream.ready.eq(1),
        ]

        # ---------------------------------------------------------------- Quantizer
        m.d.comb += [
            quant.i_stream.p.x.eq(x), quant.i_stream.p.g.eq(wsel16.as_signed()),
            quant.i_stream.p.last.eq(pend_last), quant.o_stream.ready.eq(1),
        ]

        # ---------------------------------------------------------------- MLGRU / GLU
        lb_r = Signal(16)
        with m.If(tag_valid & (tag_slot == 0) & is_op[Op.MLGRU]):
            m.d.sync += lb_r.eq(wsel16)
        m.d.comb += [
            mlgru.i_stream.p.i_pre.eq(hold0), mlgru.i_stream.p.f_pre.eq(hold1),
            mlgru.i_stream.p.gn.eq(x), mlgru.i_stream.p.lb.eq(lb_r),
            mlgru.i_stream.p.has_lb.eq(F(insn, Op.MLGRU, "has_lb")),
            mlgru.i_stream.p.g_frac.eq(F(insn, Op.MLGRU, "g_frac")),
            mlgru.i_stream.p.o_frac.eq(F(insn, Op.MLGRU, "o_frac")),
            mlgru.i_stream.p.layer.eq(F(insn, Op.MLGRU, "layer")),
            mlgru.i_stream.p.last.eq(pend_last),
            mlgru.o_stream.ready.eq(1),
            glu.i_stream.p.gate.eq(hold0), glu.i_stream.p.up.eq(x),
            glu.i_stream.p.u_frac.eq(F(insn, Op.GLU, "u_frac")),
            glu.i_stream.p.last.eq(pend_last),
            glu.o_stream.ready.eq(1),
        ]

        # ---------------------------------------------------------------- RESADD pipeline
        # residual_add(r, delta, s) = sat16(rshift_round(r, s) + delta)
        #                            = sat16(((2r >> s) + 2·delta + 1) >> 1)   (s = 0 too)
        ra_v = Signal(3)
        ra_t = Signal(signed(17))
        ra_d = Signal(signed(16))
        ra_sum = Signal(signed(18))
        ra_out = Signal(signed(16))
        ra_in = pend & is_op[Op.RESADD]
        shift = F(insn, Op.RESADD, "shift")
        ra_fits = (ra_sum[15:] == 0) | (ra_sum[15:] == 0b111)     # within int16: no carry chain
        m.d.sync += [
            ra_v.eq(Cat(ra_in, ra_v[:2])),
            ra_t.eq(Cat(C(0, 1), hold0).as_signed() >> shift),
            ra_d.eq(x),
            ra_sum.eq((ra_t + Cat(C(1, 1), ra_d).as_signed()) >> 1),
            ra_out.eq(Mux(ra_fits, ra_sum[:16], Mux(ra_sum[-1], -32768, 32767))),
        ]

        # ---------------------------------------------------------------- ARGMAX
        best = Signal(signed(16))
        best_idx = Signal(16)
        with m.If(pend & is_op[Op.ARGMAX]):
            with m.If((pend_idx == 0) | (x > best)):
                m.d.sync += [best.eq(x), best_idx.eq(pend_idx)]

        # ---------------------------------------------------------------- BITLINEAR
        cols = Signal(range(hw.max_cols + 1))
        group_cycles = Signal(range(max(hw.max_cols, lanes + 1) + 1))   # max(cols, lanes + 1)
        rows_left_feed = Signal(range(hw.max_rows))      # rows not yet fed, minus 1
        d_left = Signal(range(hw.max_rows + 1))          # sums not yet drained
        d_i = Signal(range(lanes))
        params_sent = Signal()
        fwait = Signal(range(FACTOR_CYCLES_MAX + 1))
        fwait_init = Signal.like(fwait)
        act_full = Signal()
        a_cnt = Signal(range(hw.max_cols))
        tload = Signal()
        feed_started = Signal()
        feed_active = Signal()
        f_j = Signal.like(group_cycles)
        f_j_next = (f_j + 1)[:len(f_j)]
        cols_done = Signal()
        beat_v = Signal()
        beat_first = Signal()
        beat_last = Signal()

        m.submodules.act_buf = act_buf = memory.Memory(shape=signed(8), depth=hw.max_cols, init=[])
        act_rd = act_buf.read_port()
        act_wr = act_buf.write_port()
        aw_en = Signal()
        aw_addr = Signal(range(hw.max_cols))
        aw_data = Signal(signed(8))
        aw_last = Signal()
        m.d.comb += [act_wr.en.eq(aw_en), act_wr.addr.eq(aw_addr), act_wr.data.eq(aw_data)]
        m.d.sync += aw_en.eq(quant.o_stream.valid)
        with m.If(quant.o_stream.valid):
            m.d.sync += [aw_addr.eq(a_cnt), aw_data.eq(quant.o_stream.p.a),
                         aw_last.eq(quant.o_stream.p.last), a_cnt.eq(a_cnt + 1)]
        with m.If(aw_en & aw_last):
            m.d.sync += act_full.eq(1)

        # rescale parameters: the statistics (captured) and the quantizer's held scale
        m.d.comb += [
            rescale.i_params.valid.eq(is_op[Op.BITLINEAR] & stats_ok & ~params_sent),
            rescale.i_params.p.mvn.eq(quant.mvn),
            rescale.i_params.p.sh.eq(quant.sh),
            rescale.i_params.p.mant.eq(mant_r),
            rescale.i_params.p.e.eq(e_r),
            rescale.i_params.p.gamma_mant.eq(F(insn, Op.BITLINEAR, "gamma_mant")),
            rescale.i_params.p.scale_exp.eq(F(insn, Op.BITLINEAR, "scale_exp")),
        ]
        with m.If(rescale.i_params.valid & rescale.i_params.ready):
            m.d.sync += [params_sent.eq(1), fwait.eq(fwait_init)]
        with m.Elif(fwait != 0):
            m.d.sync += fwait.eq(fwait - 1)

        # Core feed. Group 0 starts once the activations are in the buffer and early enough
        # that its sums meet the worst-case rescale factor: the first sum enters Rescale
        # cols + 3 cycles after the feed starts, the factor is ready FACTOR_CYCLES_MAX cycles
        # after the parameter beat, and the start is allowed fwait_init + 1 cycles after it.
        feed_go = Signal()
        m.d.comb += feed_go.eq(is_op[Op.BITLINEAR] & (feed_active | (
            tload & act_full & params_sent & (fwait == 0) & ~feed_started)))
        m.d.comb += col_issue.eq(feed_go & ~cols_done)
        last_group = (rows_left_feed >> lane_bits) == 0
        m.d.comb += act_rd.addr.eq(f_j)
        m.d.sync += [beat_v.eq(col_issue), beat_first.eq(f_j == 0), beat_last.eq(f_j_next == cols)]
        with m.If(feed_go):
            m.d.sync += [feed_started.eq(1), feed_active.eq(1)]
            with m.If(col_issue & (f_j_next == cols)):
                m.d.sync += cols_done.eq(1)
            with m.If(f_j_next == group_cycles):
                m.d.sync += [f_j.eq(0), cols_done.eq(0), rows_left_feed.eq(rows_left_feed - lanes)]
                with m.If(last_group):
                    m.d.sync += feed_active.eq(0)
            with m.Else():
                m.d.sync += f_j.eq(f_j_next)
        m.d.comb += [
            core.i_stream.valid.eq(beat_v),
            core.i_stream.p.trits.eq(trits),
            core.i_stream.p.act.eq(act_rd.data),
            core.i_stream.p.first.eq(beat_first),
            core.i_stream.p.last.eq(beat_last),
        ]
        with m.If(beat_v & ~core.i_stream.ready):
            m.d.sync += fault.eq(1)
        with m.If(core.i_stream.valid & core.i_stream.ready & counting):
            m.d.sync += busy.eq(busy + 1)

        # Drain: the group's sums, one per cycle through a selector and a register, into Rescale.
        dv = Signal()
        acc_width = self.units.core.acc_width
        d_acc = Signal(signed(acc_width))
        d_last = Signal()
        d_adv = ~dv | rescale.i_stream.ready
        d_take = core.o_stream.valid & d_adv
        d_end = (d_i == lanes - 1) | (d_left == 1)
        m.d.comb += core.o_stream.ready.eq(d_take & d_end)
        with m.If(d_adv):
            m.d.sync += dv.eq(d_take)
        with m.If(d_take):
            m.d.sync += [d_acc.eq(core.o_stream.payload.as_value().word_select(d_i, acc_width)),
                         d_last.eq(d_left == 1), d_left.eq(d_left - 1),
                         d_i.eq(Mux(d_end, 0, d_i + 1))]
        m.d.comb += [
            rescale.i_stream.valid.eq(dv),
            rescale.i_stream.p.acc.eq(d_acc),
            rescale.i_stream.p.last.eq(d_last),
            rescale.o_stream.ready.eq(1),
        ]
        with m.If(dv & ~rescale.i_stream.ready):
            m.d.sync += fault.eq(1)

        # ---------------------------------------------------------------- pass targets
        with m.Switch(op):
            with m.Case(Op.EMBED):
                m.d.comb += [target_ready.eq(apply.i_stream.ready),
                             apply.i_stream.valid.eq(pend)]
            with m.Case(Op.NORM):
                m.d.comb += [target_ready.eq(Mux(phase, apply.i_stream.ready, stats.i_stream.ready)),
                             apply.i_stream.valid.eq(pend & phase),
                             stats.i_stream.valid.eq(pend & ~phase)]
            with m.Case(Op.BITLINEAR):
                m.d.comb += [target_ready.eq(stats.i_stream.ready & quant.i_stream.ready),
                             stats.i_stream.valid.eq(pend & quant.i_stream.ready),
                             quant.i_stream.valid.eq(pend & stats.i_stream.ready)]
            with m.Case(Op.MLGRU):
                m.d.comb += [target_ready.eq(mlgru.i_stream.ready),
                             mlgru.i_stream.valid.eq(pend)]
            with m.Case(Op.GLU):
                m.d.comb += [target_ready.eq(glu.i_stream.ready),
                             glu.i_stream.valid.eq(pend)]
            with m.Default():                       # RESADD, ARGMAX: always take
                m.d.comb += target_ready.eq(1)
        # elements that carry weight-memory data cannot wait (that data is not held)
        with m.If(pend & ~target_ready & (is_op[Op.EMBED] | is_op[Op.BITLINEAR] | (is_op[Op.NORM] & phase))):
            m.d.sync += fault.eq(1)

        # ---------------------------------------------------------------- results
        with m.Switch(op):
            with m.Case(Op.EMBED, Op.NORM):
                m.d.comb += [res_valid.eq(apply.o_stream.valid), res_data.eq(apply.o_stream.payload)]
            with m.Case(Op.BITLINEAR):
                m.d.comb += [res_valid.eq(rescale.o_stream.valid), res_data.eq(rescale.o_stream.p.y)]
            with m.Case(Op.MLGRU):
                m.d.comb += [res_valid.eq(mlgru.o_stream.valid), res_data.eq(mlgru.o_stream.p.o)]
            with m.Case(Op.GLU):
                m.d.comb += [res_valid.eq(glu.o_stream.valid), res_data.eq(glu.o_stream.p.u)]
            with m.Case(Op.RESADD):
                m.d.comb += [res_valid.eq(ra_v[2]), res_data.eq(ra_out)]

        # ================================================================ state reset
        rs_pending = Signal()
        with m.If(self.reset_state):
            m.d.sync += rs_pending.eq(1)
        with m.Elif(mlgru.reset_state.valid & mlgru.reset_state.ready):
            m.d.sync += rs_pending.eq(0)
        m.d.comb += [mlgru.reset_state.valid.eq(rs_pending),
                     self.ready_state.eq(~rs_pending & ~mlgru.clearing)]

        # ================================================================ main FSM
        m.d.comb += [self.done.p.next_token.eq(next_token), self.done.p.cycles.eq(cycles),
                     self.done.p.busy.eq(busy)]
        with m.If(counting):
            m.d.sync += cycles.eq(cycles + 1)

        # per-instruction setup, in the decode cycle
        def decode(m):
            n_field = {Op.EMBED: "n", Op.NORM: "n", Op.BITLINEAR: "cols", Op.MLGRU: "n",
                       Op.GLU: "n", Op.RESADD: "n", Op.ARGMAX: "n"}
            out_field = {Op.EMBED: "n", Op.NORM: "n", Op.BITLINEAR: "rows", Op.MLGRU: "n",
                         Op.GLU: "n", Op.RESADD: "n"}
            bases = {Op.NORM: ["src"], Op.BITLINEAR: ["src"], Op.MLGRU: ["i_src", "f_src", "gn_src"],
                     Op.GLU: ["gate_src", "up_src"], Op.RESADD: ["dst", "src"], Op.ARGMAX: ["src"]}
            new_op = insn[:4]
            m.d.sync += [op.eq(new_op), phase.eq(0), stats_ok.eq(0), params_sent.eq(0), fwait.eq(0),
                         act_full.eq(0), a_cnt.eq(0), tload.eq(0), feed_started.eq(0),
                         feed_active.eq(0), f_j.eq(0), cols_done.eq(0), d_i.eq(0), pend.eq(0),
                         p_slot.eq(0), p_j.eq(0), p_active.eq(0)]
            n_dec = Signal.like(p_n)       # the op's element count (BITLINEAR: cols)
            with m.Switch(new_op):
                for o, name in n_field.items():
                    with m.Case(o):
                        m.d.comb += n_dec.eq(F(insn, o, name))
            n = n_dec
            rows = F(insn, Op.BITLINEAR, "rows")
            m.d.sync += [p_n.eq(n), out_left.eq(Mux(new_op == Op.BITLINEAR, rows, n))]
            with m.Switch(new_op):
                for o in n_field:
                    with m.Case(o):
                        if o in out_field:
                            m.d.sync += wr_ptr.eq(F(insn, o, "dst"))
                        for i, bname in enumerate(bases.get(o, [])):
                            m.d.sync += b[i].eq(F(insn, o, bname))
                        m.d.sync += p_k1.eq(max(len(bases.get(o, [None])) - 1, 0))
                        if o != Op.EMBED:
                            m.d.sync += p_active.eq(1)
                        if o == Op.EMBED:
                            tok = token[:max(hw.max_vocab - 1, 1).bit_length()]
                            n_e = F(insn, o, "n")
                            rw = ((n_e + 7) >> 3)[:max(hw.max_d // 8 + 1, 1).bit_length()]
                            half = (len(rw) + 1) // 2
                            for i, bits in enumerate((range(half), range(half, len(rw)))):
                                m.d.sync += emb_row[i].eq(
                                    sum((Mux(rw[k], tok << k, 0) for k in bits), C(0, 1)))
                            m.d.sync += [wmode.eq(_W16), wslot.eq(token[:2]),
                                         wptr.eq(F(insn, o, "scale_addr") + token[2:])]
                        if o == Op.BITLINEAR:
                            c = F(insn, o, "cols")
                            m.d.sync += [wptr.eq(F(insn, o, "g_addr")), wslot.eq(0), wmode.eq(_W16),
                                         cols.eq(c), group_cycles.eq(Mux(c > lanes, c, lanes + 1)),
                                         rows_left_feed.eq(rows - 1), d_left.eq(rows),
                                         fwait_init.eq(Mux(c < FACTOR_CYCLES_MAX - 4,
                                                           FACTOR_CYCLES_MAX - 4 - c, 0))]
                        if o == Op.MLGRU:
                            m.d.sync += [wptr.eq(F(insn, o, "lb_addr")), wslot.eq(0), wmode.eq(_W16)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                m.d.comb += self.start.ready.eq(self.model_ok)
                with m.If(self.start.valid & self.model_ok):
                    m.d.sync += [token.eq(self.start.p.token), pc.eq(self.program_addr),
                                 insn_left.eq(Mux(self.program_length > max_insns, max_insns,
                                                  self.program_length)),
                                 next_token.eq(0),
                                 cycles.eq(0), busy.eq(0)]
                    m.next = "ALIGN"
            with m.State("ALIGN"):
                # MLGRU's i_stream.ready is high in one cycle of its 3-cycle phase (and not
                # while it clears its state): start every token in the same phase
                with m.If(mlgru.i_stream.ready & ~rs_pending):
                    m.d.sync += counting.eq(1)
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
                    m.next = "EXEC"
            with m.State("EXEC"):
                with m.Switch(op):
                    with m.Case(Op.EMBED):
                        with m.If(~phase):              # t = 0: the row scale's word is read
                            m.d.comb += start_pass.eq(1)
                            m.d.sync += [phase.eq(1), emb_cap.eq(1), wmode.eq(_W8), wslot.eq(0),
                                         wptr.eq(F(insn, Op.EMBED, "table_addr")
                                                 + emb_row[0] + emb_row[1])]
                    with m.Case(Op.NORM):
                        with m.If(~phase & stats_ok):  # statistics moved in: the apply pass
                            m.d.comb += start_pass.eq(1)
                            m.d.sync += [phase.eq(1), wmode.eq(_W16), wslot.eq(0),
                                         wptr.eq(F(insn, Op.NORM, "w_addr"))]
                    with m.Case(Op.BITLINEAR):
                        with m.If(~p_active & ~tload):  # x pass issued: point at the trits
                            m.d.sync += [tload.eq(1), wmode.eq(_WT), wslot.eq(0),
                                         wptr.eq(F(insn, Op.BITLINEAR, "trit_addr"))]
                    with m.Case(Op.ARGMAX):
                        with m.If(pass_done):
                            m.d.sync += next_token.eq(best_idx)
                            m.next = "FETCH0"
                with m.If(body_written):
                    m.next = "FETCH0"
            with m.State("DONE"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    m.next = "IDLE"
        m.d.comb += self.running.eq(~fsm.ongoing("IDLE") & ~fsm.ongoing("DONE"))
        return m
