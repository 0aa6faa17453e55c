"""The MLGRU state unit: forget gate, state update and output gate of the token mixer.

Per channel (docs/arithmetic.md, "MLGRU"; ``mmfree.models.arith``)::

    f  = arith.forget_gate(f_pre, lb if has_lb else None)
    h' = arith.mlgru_update(h, i_pre, f)          # h: this layer's state, kept in the unit
    o  = arith.output_gate(gn, g_frac, h', o_frac)

Three sigmoid evaluations per element share one :class:`~mmfree.hdl.activation.SigmoidPipe`,
and five products share one 16x16 multiplier, so the unit accepts one element every three
cycles (see :class:`MLGRU` for the schedule).
"""

from amaranth import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from mmfree.models.arith import PRE_FRAC

from .activation import HALF_Q15, SigmoidPipe, add_output_skid, clamp_half_round

__all__ = ["MLGRU", "MLGRUInput", "MLGRUOutput", "FRAC_BITS", "MAX_STATE_WORDS"]

FRAC_BITS = 4                # g_frac (g_norm out_frac) and o_frac are in 0..15
# o = sat16(rshift_round(gn · silu(h'), g_frac + PRE_FRAC - o_frac)): the shift s is in -5..25;
# the unit computes ((P << _O_PRESHIFT) >> (s - 1 + _O_PRESHIFT) + 1) >> 1, which is exact
# for left shifts (s <= 0) too, with a shift amount in 0..30
_O_PRESHIFT = (1 << FRAC_BITS) - PRE_FRAC
MAX_STATE_WORDS = 1 << 16    # max_layers · max_d: far beyond an iCE40's 30 EBRs already
_MUL = 2                     # shared multiplier: operands presented in cycle Y, product in Y + 2
_II = 3                      # cycles per element


def layer_bits(max_layers: int) -> int:
    return max(1, ceil_log2(max_layers))


class MLGRUInput(data.StructLayout):
    """One channel: ``i_pre``, ``f_pre`` (int16, PRE_FRAC), ``gn`` (the g_norm output, int16 with
    ``g_frac`` fractional bits), ``lb`` (the channel's lower bound, Q1.15 in 0..32768, used only
    when ``has_lb``), ``g_frac`` (0..15), ``o_frac`` (the format of o, 0..15), ``layer`` (whose
    state), ``last`` (ends the token)."""

    def __init__(self, max_layers: int = 1):
        super().__init__({"i_pre": signed(16), "f_pre": signed(16), "gn": signed(16),
                          "lb": unsigned(16), "has_lb": 1, "g_frac": unsigned(FRAC_BITS),
                          "o_frac": unsigned(FRAC_BITS),
                          "layer": unsigned(layer_bits(max_layers)), "last": 1})


class MLGRUOutput(data.StructLayout):
    """``o`` (int16, ``o_frac`` fractional bits) and ``last`` of the input element."""

    def __init__(self):
        super().__init__({"o": signed(16), "last": 1})


class MLGRU(wiring.Component):
    """MLGRU state unit with on-chip state for ``max_layers`` layers of up to ``max_d`` channels.

    For each input element (channel ``c`` of a token, layer ``l``)::

        f  = arith.forget_gate(f_pre, lb if has_lb else None)
        h' = arith.mlgru_update(h[l][c], i_pre, f);   h[l][c] = h'
        o  = arith.output_gate(gn, g_frac, h', o_frac)

    bit for bit. The state h (int16, PRE_FRAC) lives in a memory of ``max_layers · max_d`` words
    at address ``l · max_d + c`` (EBRs: 256 words each). It is zero after reset.

    Parameters
    ----------
    max_d : int
        Most channels per token (``d``), 1 or more.
    max_layers : int
        Layers with a state of their own, 1 or more (``layer`` selects one per element).

    Ports
    -----
    i_stream : In(stream.Signature(MLGRUInput(max_layers)))
        Elements in channel order: the unit counts the channel from 0 and restarts at 0 after an
        element with ``last`` (and after a state reset). ``has_lb``, ``g_frac``, ``o_frac`` and
        ``layer`` are per-token values that every element carries; tokens of different layers
        (and of different lengths) may follow each other in any order. Contract: a token has at most
        ``max_d`` elements (the count wraps there), ``layer < max_layers``, ``lb <= 32768``.
    o_stream : Out(stream.Signature(MLGRUOutput()))
        ``o`` for each element, in input order, with its ``last``.
    reset_state : In(stream.Signature(0))
        A transfer requests that all state be zeroed. Elements that transferred before (or in
        the same cycle as) the request use the old state. From the request on,
        ``i_stream.ready`` stays low until the memory is clear: launched elements first write
        their h' back (at most 13 cycles), then one word is cleared per cycle
        (``max_layers · max_d`` cycles). The channel count restarts at 0. The same clear runs
        after reset, so ``i_stream.ready`` first rises about ``max_layers · max_d`` cycles after it.
    clearing : Out(1)
        High from a request (or reset) until the state is zero.

    Throughput and latency
    ----------------------
    One element per ``II`` = 3 cycles: ``i_stream.ready`` is high only in cycles of phase 0 of
    a free-running 3-cycle counter, so an element waits up to 2 cycles for its launch.
    ``o_stream.valid`` rises ``LATENCY`` = 26 cycles after the cycle in which the element
    transfers (without back-pressure). An element that may have the address of the element
    launched one slot earlier (after a token of a single channel, or with ``max_d`` = 1) waits
    one more slot, as that h' is not yet written. ``i_stream.ready`` and ``reset_state.ready``
    depend only on this unit's registers (not on payloads or ``o_stream.ready``);
    ``o_stream.ready`` may drop at any time: the pipeline then stalls as a whole, losing nothing.

    Schedule (cycles after the launch of an element, phase = cycle mod 3)
    --------------------------------------------------------------------
    The sigmoid pipeline (σ after 4 cycles, silu after 6) takes f_pre at 0, i_pre at 1 and h'
    at 14; the shared multiplier (product 2 cycles after its operands) computes
    ``(2**14 - lb) · (σ(f_pre) - 2**14)`` at 4, ``f · ((h - silu(i_pre)) >> 1)`` at 9 and
    ``gn · silu(h')`` at 20. Each of the two serves one element per phase, so elements three
    cycles apart never collide. The state is read at 7 and written at 12. Every product is a
    signed 16x16 one (σ and f enter in offset or split forms that ``elaborate`` derives), so
    the multiplier maps onto one SB_MAC16 with its operand and product registers.

    Resources: the sigmoid ROM (two EBRs), the state memory (``max_layers · max_d`` words of 16
    bits, 256 per EBR), two SB_MAC16 (the sigmoid pipeline's and the shared one).
    """

    II = _II
    # schedule, in cycles after the launch (SigmoidPipe latencies: σ 4, silu 6)
    T_SC_F, T_SC_I = 0, 1                              # f_pre, i_pre into the sigmoid pipeline
    T_LB = T_SC_F + SigmoidPipe.SIGMA_LATENCY          # 4: σ(f_pre) → multiplier (lower bound)
    T_F = T_LB + _MUL                                  # 6: f
    T_READ = T_SC_I + SigmoidPipe.SILU_LATENCY         # 7: silu(i_pre); state read address
    T_DH = T_READ + 1                                  # 8: h, dh = h - silu(i)
    T_UPD = T_DH + 1                                   # 9: f · (dh >> 1) → multiplier
    T_Y = T_UPD + _MUL                                 # 11: h'
    T_WRITE = T_Y + 1                                  # 12: h' written back
    T_SC_H = T_Y + 1 + (2 - T_Y - 1) % _II             # 14: h' into the pipeline (phase 2)
    T_OUT = T_SC_H + SigmoidPipe.SILU_LATENCY          # 20: gn · silu(h') → multiplier
    T_Q = T_OUT + _MUL                                 # 22: product shifted by 4·(shift >> 2)
    T_Q2 = T_Q + 1                                     # 23: … and by shift & 3
    T_C = T_Q2 + 1                                     # 24: … clamped to 17 bits
    T_PUSH = T_C + 1                                   # 25: (… + 1) >> 1 into the output
    LATENCY = T_PUSH + 1                               # transfer (= launch) → o_stream.valid

    def __init__(self, max_d: int, max_layers: int = 1):
        if not isinstance(max_d, int) or max_d < 1:
            raise ValueError(f"max_d must be a positive number of channels, not {max_d!r}")
        if not isinstance(max_layers, int) or max_layers < 1:
            raise ValueError(f"max_layers must be 1 or more, not {max_layers!r}")
        if max_d * max_layers > MAX_STATE_WORDS:
            raise ValueError(f"max_layers · max_d = {max_d * max_layers} state words exceed "
                             f"{MAX_STATE_WORDS}; use fewer layers or channels per unit")
        self.max_d = max_d
        self.max_layers = max_layers
        self.depth = max_d * max_layers
        super().__init__({
            "i_stream": In(stream.Signature(MLGRUInput(max_layers))),
            "o_stream": Out(stream.Signature(MLGRUOutput())),
            "reset_state": In(stream.Signature(0)),
            "clearing": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        # the sigmoid pipeline and the multiplier each take one operation per phase
        assert len({self.T_SC_F % _II, self.T_SC_I % _II, self.T_SC_H % _II}) == _II
        assert len({self.T_LB % _II, self.T_UPD % _II, self.T_OUT % _II}) == _II
        # a value loaded into a hold register at the end of cycle t serves cycles t+1 .. t+3
        for t_load, t_use in [(self.T_LB, self.T_F), (self.T_F, self.T_UPD),
                              (self.T_READ, self.T_UPD), (self.T_DH, self.T_Y),
                              (self.T_UPD, self.T_Y), (self.T_Y, self.T_SC_H),
                              (self.T_Y, self.T_WRITE), (self.T_Q, self.T_Q2),
                              (self.T_Q2, self.T_C), (self.T_C, self.T_PUSH)]:
            assert t_load < t_use <= t_load + _II, (t_load, t_use)

        def reg(shape, name):
            return Signal(shape, name=name, reset_less=True)

        m.submodules.sc = sc = SigmoidPipe()
        state = Memory(shape=signed(16), depth=self.depth, init=[])
        m.submodules.state = state
        rd = state.read_port(domain="sync")
        wr = state.write_port()

        push = Signal()
        o_value = Signal(signed(16))
        o_last = Signal()
        en = add_output_skid(m, self.o_stream, push, Cat(o_value, o_last))
        m.d.comb += [sc.en.eq(en), sc.i_valid.eq(1), rd.en.eq(en)]

        ph = Signal(range(_II))
        with m.If(en):
            m.d.sync += ph.eq(Mux(ph == _II - 1, 0, ph + 1))

        def phase_flag(t):
            """A register of its own that is high in the cycles of the phase of time t: the
            decodes of ph fan out to hundreds of enables (global nets, slow into logic), so the
            handshake and write-enable logic gets private copies."""
            flag = Signal(init=t % _II == 0, name=f"ph_is_{t % _II}_for_{t}")
            with m.If(en):
                m.d.sync += flag.eq(ph == (t - 1) % _II)
            return flag

        def at(t):
            """True in the enabled cycles of the phase of schedule time t."""
            return en & (ph == t % _II)

        # ---------------------------------------------------------------- element stages
        # An element is launched in the cycle it transfers (always of phase 0). Stage k holds
        # it during cycles 3k-2 .. 3k after its launch; all stages move at the end of phase 0.
        # Each stage keeps only the fields still needed.
        def stage_of(t):
            return (t + _II - 1) // _II

        addr_shape = unsigned(ceil_log2(self.depth) or 1)
        fields = {"i_pre": (signed(16), self.T_SC_I), "lb": (unsigned(16), self.T_F),
                  "addr": (addr_shape, self.T_WRITE), "same_chan": (1, self.T_SC_I),
                  "gn": (signed(16), self.T_OUT), "o_shift": (unsigned(5), self.T_Q2),
                  "last": (1, self.T_PUSH), "valid": (1, self.T_PUSH)}
        n_stages = stage_of(self.T_PUSH)
        st = [None] + [{} for _ in range(n_stages)]
        for k in range(1, n_stages + 1):
            for name, (shape, t) in fields.items():
                if stage_of(t) >= k:
                    st[k][name] = (Signal(name=f"s{k}_valid") if name == "valid" else
                                   reg(shape, f"s{k}_{name}"))

        def field(name, t):
            return st[stage_of(t)][name]

        # ---------------------------------------------------------------- input and launch
        chan = Signal(range(self.max_d))         # channel of the next element
        next_chan = Signal(range(self.max_d))
        clear_pending = Signal(init=1)
        clearing = Signal()
        clear_addr = Signal(range(self.depth))
        p = self.i_stream.p
        m.d.comb += next_chan.eq(Mux(p.last | (chan == self.max_d - 1), 0, chan + 1))
        # A launch reads h before the previous element of the same address has written it back
        # only when they are one slot apart (read at 7 + 3 < write at 12 < read at 7 + 6). The
        # element in stage 1 has the next element's address only if its token ended at channel
        # 0 (or max_d = 1) and the layers match; the layer is not checked, so that ready does
        # not depend on the payload: such an element waits one slot.
        assert self.T_READ + _II <= self.T_WRITE < self.T_READ + 2 * _II
        hazard = st[1]["valid"] & st[1]["same_chan"]
        m.d.comb += [
            self.i_stream.ready.eq(en & phase_flag(0) & ~hazard & ~clear_pending & ~clearing),
            self.reset_state.ready.eq(~clear_pending & ~clearing),
            self.clearing.eq(clear_pending | clearing),
        ]
        launch = self.i_stream.valid & self.i_stream.ready
        assert stage_of(self.T_LB) == 2
        cm = reg(signed(16), "s2_cm")
        # layer · max_d as shifts and adds (a constant: no multiplier)
        layer_base = sum(p.layer << b for b in range(self.max_d.bit_length())
                         if self.max_d >> b & 1)
        with m.If(launch):
            m.d.sync += chan.eq(next_chan)
        with m.If(at(0)):
            m.d.sync += [
                st[1]["valid"].eq(launch),
                st[1]["i_pre"].eq(p.i_pre),
                st[1]["lb"].eq(Mux(p.has_lb, p.lb, 0)),
                st[1]["addr"].eq(layer_base + chan),
                st[1]["gn"].eq(p.gn),
                st[1]["same_chan"].eq(next_chan == chan),
                st[1]["o_shift"].eq(p.g_frac + (PRE_FRAC - 1 + _O_PRESHIFT) - p.o_frac),
                st[1]["last"].eq(p.last),
            ]
            for k in range(2, n_stages + 1):
                m.d.sync += [sig.eq(st[k - 1][name]) for name, sig in st[k].items()]
            # the multiplier operand 2**14 - lb, ready in stage 2 (no subtraction in front of the
            # multiplier's operand register)
            m.d.sync += cm.eq(HALF_Q15 - st[1]["lb"])

        # ---------------------------------------------------------------- shared multiplier
        mul_a = reg(signed(16), "mul_a")
        mul_b = reg(signed(16), "mul_b")
        prod = reg(signed(32), "prod")
        with m.If(en):
            m.d.sync += prod.eq(mul_a * mul_b)

        # ---------------------------------------------------------------- forget gate
        # c = 2**15 - lb and σ are in [0, 2**15]: too wide for signed 16-bit operands, so
        # multiply cm = c - 2**14 = 2**14 - lb by sigma_m = σ - 2**14 (both in ±2**14):
        #   c·σ = cm·sigma_m + 2**14·(cm + sigma_m) + 2**28, hence
        #   f = lb + rshift_round(c·σ, 15)
        #     = lb + ((cm·sigma_m >> 14) + 2**15 + 1 - lb + sigma_m) >> 1
        # (lb = 0 gives f = σ: a layer without lower bound is lb = 0).
        csum = reg(signed(18), "csum")           # 2**15 + 1 - lb + sigma_m
        with m.If(at(self.T_LB)):
            m.d.sync += csum.eq(cm + sc.sigma_m + (HALF_Q15 + 1))
        f = reg(unsigned(16), "f")               # Q1.15, 0..2**15
        with m.If(at(self.T_F)):
            m.d.sync += f.eq(field("lb", self.T_F) + (((prod >> 14) + csum) >> 1))

        # ---------------------------------------------------------------- state update
        # h' = rshift_round(f·h + (2**15 - f)·s, 15) = s + rshift_round(f·dh, 15), dh = h - s,
        # s = silu(i_pre). dh has 17 bits: f·dh = 2·f·(dh >> 1) + f·dh[0] with f < 2**15 as a
        # signed operand; f = 2**15 (σ saturated, or lb = 2**15) keeps h: h' = h. So
        #   h' = (2·f·(dh >> 1) + base) >> 15,  base = 2**15·s + 2**14 + (dh[0] ? f : 0).
        s = reg(signed(16), "s")
        with m.If(at(self.T_READ)):
            m.d.sync += s.eq(sc.silu)
        m.d.comb += rd.addr.eq(field("addr", self.T_READ))
        h = reg(signed(16), "h")
        dh = reg(signed(17), "dh")
        with m.If(at(self.T_DH)):
            m.d.sync += [h.eq(rd.data), dh.eq(rd.data - s)]
        base = reg(signed(32), "base")
        keep_h = reg(1, "keep_h")
        with m.If(at(self.T_UPD)):
            m.d.sync += [base.eq((s << 15) + (1 << 14) + Mux(dh[0], f[:15], 0)),
                         keep_h.eq(f[15])]
        h_new = reg(signed(16), "h_new")         # |h'| <= max(|h|, |s|): a convex combination
        with m.If(at(self.T_Y)):
            m.d.sync += h_new.eq(Mux(keep_h, h, ((prod << 1) + base) >> 15))

        with m.If(clearing):
            m.d.comb += [wr.addr.eq(clear_addr), wr.data.eq(0), wr.en.eq(1)]
        with m.Else():
            m.d.comb += [wr.addr.eq(field("addr", self.T_WRITE)), wr.data.eq(h_new),
                         wr.en.eq(en & phase_flag(self.T_WRITE) & field("valid", self.T_WRITE))]

        # ---------------------------------------------------------------- sigmoid pipeline input
        with m.Switch(ph):
            with m.Case(self.T_SC_F % _II):
                m.d.comb += sc.i_x.eq(p.f_pre)
            with m.Case(self.T_SC_I % _II):
                m.d.comb += sc.i_x.eq(field("i_pre", self.T_SC_I))
            with m.Case(self.T_SC_H % _II):
                m.d.comb += sc.i_x.eq(h_new)

        # ---------------------------------------------------------------- output gate
        # o = sat16(rshift_round(gn · silu(h'), s)), s = g_frac + PRE_FRAC - o_frac in -5..25:
        # rshift_round(v, s) = ((v >> (s - 1)) + 1) >> 1 for s >= 1, and v << -s for s <= 0,
        # which the same formula gives when v is first scaled up: o_shift = s - 1 + _O_PRESHIFT.
        # the multiplier's operands: one product per phase (selects from private phase flags)
        sel_lb, sel_upd = phase_flag(self.T_LB), phase_flag(self.T_UPD)
        with m.If(en):
            m.d.sync += [
                mul_a.eq(Mux(sel_lb, cm, Mux(sel_upd, f[:15], field("gn", self.T_OUT)))),
                mul_b.eq(Mux(sel_lb, sc.sigma_m, Mux(sel_upd, dh >> 1, sc.silu))),
            ]
        # the shift in two cycles (at most 3 multiplexer levels each)
        q_coarse = reg(signed(32 + _O_PRESHIFT), "q_coarse")
        with m.If(at(self.T_Q)):
            coarse = Cat(0, 0, field("o_shift", self.T_Q)[2:])          # a multiple of 4
            m.d.sync += q_coarse.eq((prod << _O_PRESHIFT) >> coarse)
        q = reg(signed(32 + _O_PRESHIFT), "q")
        with m.If(at(self.T_Q2)):
            m.d.sync += q.eq(q_coarse >> field("o_shift", self.T_Q2)[:2])
        q_clamped = reg(signed(17), "q_clamped")
        with m.If(at(self.T_C)):
            m.d.sync += q_clamped.eq(clamp_half_round(q))
        m.d.comb += [
            o_value.eq((q_clamped + 1) >> 1),
            o_last.eq(field("last", self.T_PUSH)),
            push.eq(en & phase_flag(self.T_PUSH) & field("valid", self.T_PUSH)),
        ]

        # ---------------------------------------------------------------- state reset
        # Wait until every launched element has written its h' (stages up to the write), then
        # zero one word per cycle.
        unwritten = [st[k]["valid"] for k in range(1, stage_of(self.T_WRITE) + 1)]
        with m.If(self.reset_state.valid & self.reset_state.ready):
            m.d.sync += [clear_pending.eq(1), chan.eq(0)]
        with m.If(clear_pending & ~Cat(*unwritten).any()):
            m.d.sync += [clear_pending.eq(0), clearing.eq(1), clear_addr.eq(0)]
        with m.If(clearing):
            m.d.sync += clear_addr.eq(clear_addr + 1)
            with m.If(clear_addr == self.depth - 1):
                m.d.sync += clearing.eq(0)
        return m
