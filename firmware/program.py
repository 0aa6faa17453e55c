"""The program the sequencer runs for each token of a model, and its scratch buffers.

One token, straight-line (docs/isa.md shows the listing of the shipped model)::

    EMBED                                   token → r
    per layer l:
        NORM       attn_norm                r → x
        BITLINEAR  i_proj, f_proj, g_proj   x → i, f, g
        NORM       g_norm                   g → gn
        MLGRU      layer l                  i, f, gn → o        (state h of layer l)
        BITLINEAR  o_proj                   o → delta
        RESADD     res_fracs[2l] - res_fracs[2l+1]              r += delta
        NORM       mlp_norm                 r → x
        BITLINEAR  gate_proj                x → gate_up  (rows 0..I-1 gate, I..2I-1 up)
        GLU                                 gate_up → u
        BITLINEAR  down_proj                u → delta
        RESADD     res_fracs[2l+1] - res_fracs[2l+2]            r += delta
    NORM       final_norm                   r → x
    BITLINEAR  lm_head                      x → logits
    ARGMAX                                  logits → next_token
    HALT

This is :meth:`mmfree.models.golden.IntegerModel.step` instruction by instruction; every
constant of the :class:`~mmfree.models.quantized.QuantizedModel` is an operand here or a
vector in weight memory (:mod:`mmfree.firmware.image` places them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mmfree.models import arith
from mmfree.models.quantized import BitLinearParams, NormParams, QuantizedModel

from .isa import GLU, MLGRU, ArgMax, BitLinear, Embed, Halt, Instruction, Norm, ResAdd

__all__ = ["ScratchMap", "program_length", "generate_program", "INSTRUCTIONS_PER_LAYER"]

INSTRUCTIONS_PER_LAYER = 13
_FIXED_INSTRUCTIONS = 5         # EMBED, final NORM, head BITLINEAR, ARGMAX, HALT


def program_length(n_layers: int) -> int:
    """Instructions of the program of a model with ``n_layers`` layers."""
    return INSTRUCTIONS_PER_LAYER * n_layers + _FIXED_INSTRUCTIONS


@dataclass(frozen=True)
class ScratchMap:
    """Word addresses of the scratch buffers (int16) of a model with hidden size ``d``,
    intermediate size ``inter`` and vocabulary ``vocab``.

    ``r`` (residual), ``x`` (norm output) and ``delta`` (o_proj/down_proj output) are d words
    each and always distinct. The rest share one region that each phase of a token uses in
    turn: the token mixer ``i, f, g, gn, o`` (d each), the channel mixer ``gate_up`` (2I) and
    ``u`` (I), the head's ``logits`` (V, left there for the LOGITS command until the next
    token). ``words`` = ``3d + max(5d, 3I, V)``."""
    r: int
    x: int
    delta: int
    i: int
    f: int
    g: int
    gn: int
    o: int
    gate_up: int
    u: int
    logits: int
    words: int

    @classmethod
    def for_dims(cls, d: int, inter: int, vocab: int) -> "ScratchMap":
        shared = 3 * d
        return cls(r=0, x=d, delta=2 * d,
                   i=shared, f=shared + d, g=shared + 2 * d, gn=shared + 3 * d, o=shared + 4 * d,
                   gate_up=shared, u=shared + 2 * inter, logits=shared,
                   words=shared + max(5 * d, 3 * inter, vocab))


def _norm(p: NormParams, src: int, dst: int, n: int, w_addr: int, comment: str) -> Norm:
    return Norm(dst=dst, src=src, n=n, w_addr=w_addr, frac_diff=p.w_frac - p.out_frac,
                eps_q=int(p.eps_q), comment=comment)


def _bitlinear(p: BitLinearParams, src: int, dst: int, g_addr: int, trit_addr: int,
               comment: str) -> BitLinear:
    rows, cols = p.trits.shape
    return BitLinear(dst=dst, src=src, rows=int(rows), cols=int(cols), g_addr=g_addr,
                     trit_addr=trit_addr, eps_q=int(p.eps_q), gamma_mant=int(p.gamma_mant),
                     scale_exp=int(p.scale_exp), comment=comment)


def generate_program(qm: QuantizedModel, addr: Mapping[str, int], scratch: ScratchMap) -> list[Instruction]:
    """The per-token program of ``qm``. ``addr`` maps the names of
    :meth:`mmfree.firmware.image.MemoryMap` regions (``embed.q``, ``<norm>.w``,
    ``<bitlinear>.g``, ``<bitlinear>.trits``, ``layers.<l>.lower_bound``) to word addresses.
    The instructions are not checked against a hardware configuration here (encoding does)."""
    cfg = qm.cfg
    d, inter, V = cfg.d, cfg.intermediate_size, cfg.vocab_size
    s = scratch
    rf = qm.res_fracs

    def bl(name: str, p: BitLinearParams, src: int, dst: int, note: str) -> BitLinear:
        return _bitlinear(p, src, dst, addr[f"{name}.g"], addr[f"{name}.trits"], f"{name}: {note}")

    prog: list[Instruction] = [
        Embed(dst=s.r, n=d, table_addr=addr["embed.q"], scale_addr=addr["embed.scale"],
              emb_shift=int(qm.emb_shift), comment=f"embedding: token -> r (res_fracs[0] = {rf[0]})")]
    for l, p in enumerate(qm.layers):
        pre = f"layers.{l}"
        lb = p.lower_bound is not None
        prog += [
            _norm(p.attn_norm, s.r, s.x, d, addr[f"{pre}.attn_norm.w"], f"{pre}.attn_norm: r -> x"),
            bl(f"{pre}.i_proj", p.i_proj, s.x, s.i, "x -> i"),
            bl(f"{pre}.f_proj", p.f_proj, s.x, s.f, "x -> f"),
            bl(f"{pre}.g_proj", p.g_proj, s.x, s.g, "x -> g"),
            _norm(p.g_norm, s.g, s.gn, d, addr[f"{pre}.g_norm.w"], f"{pre}.g_norm: g -> gn"),
            MLGRU(dst=s.o, i_src=s.i, f_src=s.f, gn_src=s.gn, n=d, layer=l, has_lb=int(lb),
                  lb_addr=addr[f"{pre}.lower_bound"] if lb else 0, g_frac=p.g_norm.out_frac,
                  o_frac=p.o_frac, comment=f"{pre}.mlgru: i, f, gn -> o"
                                           + ("" if lb else " (no lower bound)")),
            bl(f"{pre}.o_proj", p.o_proj, s.o, s.delta, "o -> delta"),
            ResAdd(dst=s.r, src=s.delta, n=d, shift=rf[2 * l] - rf[2 * l + 1],
                   comment=f"{pre}: r += delta (res_fracs {rf[2 * l]} -> {rf[2 * l + 1]})"),
            _norm(p.mlp_norm, s.r, s.x, d, addr[f"{pre}.mlp_norm.w"], f"{pre}.mlp_norm: r -> x"),
            bl(f"{pre}.gate_proj", p.gate_proj, s.x, s.gate_up, "x -> gate, up"),
            GLU(dst=s.u, gate_src=s.gate_up, up_src=s.gate_up + inter, n=inter, u_frac=p.u_frac,
                comment=f"{pre}.glu: gate, up -> u"),
            bl(f"{pre}.down_proj", p.down_proj, s.u, s.delta, "u -> delta"),
            ResAdd(dst=s.r, src=s.delta, n=d, shift=rf[2 * l + 1] - rf[2 * l + 2],
                   comment=f"{pre}: r += delta (res_fracs {rf[2 * l + 1]} -> {rf[2 * l + 2]})"),
        ]
    prog += [
        _norm(qm.final_norm, s.r, s.x, d, addr["final_norm.w"], "final_norm: r -> x"),
        bl("lm_head", qm.lm_head, s.x, s.logits, f"x -> logits (LOGIT_FRAC = {arith.LOGIT_FRAC})"),
        ArgMax(src=s.logits, n=V, comment="logits -> next_token"),
        Halt(comment="end of token"),
    ]
    assert len(prog) == program_length(cfg.n_layers)
    return prog
