"""The element ALU ("VALU") of the v2 accelerator core and the microcode that runs every
element-wise macro-op of the instruction set on it.

One pipelined datapath replaces the separate NormApply, Quantizer, Rescale, MLGRU, GLU and
residual-add units of the v1 core, which did not fit the iCE40UP5K together. Per element it
computes

    p = a · b · m                         (exact; a int17, b int16, m uint16: |p| < 2**48)
    q = rshift_round(p, s)   (ROUND)      or  trunc(p / 2**s) toward zero  (TRUNC, s <= 16)
    y = c + q                             (c int17)
    out = sat16(y) (SAT16)   or  min(max(y, 0), 65535) (U16)

and, in SIGMOID mode, ``arith.sigmoid_q`` of ``a`` through the same multiplier (the table
interpolation ``L[k] + rshift_round(D·r, 6)`` is one such product, ``σ(-x) = 2**15 - σ(x)``
is ``c - q``).

A macro-op (docs/isa.md) runs as a short list of *sub-passes*: each streams ``n`` elements
through the VALU, one per cycle, reading up to two scratch vectors (``X`` and ``Y``, the
scratch memory has two read ports), the weight memory (``W``), the MLGRU state (``H``) or the
ternary core's sums (``ACC``), and writes scratch, the state, the activation buffer or
nothing. ``MICROCODE`` lists them; the gateware sequencer (hdl/sequencer.py) builds its
control ROM from it and :func:`run_microcode` executes it here, so tests prove the
decomposition equal to the ``arith`` functions before any gateware runs it.

This module is plain Python (no Amaranth); it is the single source of truth shared by the
gateware, the cost model and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from mmfree.models import arith

__all__ = ["Mode", "Out", "ASrc", "BSrc", "MSrc", "CSrc", "ShiftSrc", "Base", "Dst", "Reduce",
           "SubPass", "MICROCODE", "valu", "sigmoid_operands", "run_microcode", "Operands",
           "TEMP_VECTORS", "OPERAND_FIELDS", "WKind", "A_BITS", "B_BITS", "M_BITS", "C_BITS", "S_BITS", "TRUNC_MAX_SHIFT",
           "bitlinear_scalars", "BitLinearScalars"]

A_BITS = 17          # a: signed
B_BITS = 16          # b: signed
M_BITS = 16          # m: unsigned
C_BITS = 17          # c: signed
S_BITS = 6           # s: 0..63
TRUNC_MAX_SHIFT = 16
SIG_SHIFT = arith.SIG_STEP_BITS        # the table interpolation's shift (6)


class Mode(IntEnum):
    ROUND = 0
    TRUNC = 1
    SIGMOID = 2


class Out(IntEnum):
    SAT16 = 0
    U16 = 1


def _check(name, v, lo, hi):
    if not lo <= v <= hi:
        raise ValueError(f"VALU operand {name} = {v} is outside [{lo}, {hi}]")


def sigmoid_operands(x: int, lut=None) -> tuple[int, int, int, int, int, bool]:
    """The operands SIGMOID mode derives from ``x`` (int16): ``(a, b, m, c, s, negate)`` with
    ``σ = c - q`` when ``negate`` else ``c + q``, ``q = rshift_round(a·b·m, s)``."""
    table = arith.sigmoid_lut() if lut is None else lut
    ax = min(abs(int(x)), (1 << 14) - 1)
    k, r = ax >> SIG_SHIFT, ax & ((1 << SIG_SHIFT) - 1)
    lo = int(table[k])
    d = int(table[min(k + 1, arith.SIG_LUT_SIZE - 1)]) - lo
    neg = x < 0
    return d, r, 1, (arith.ONE_Q15 - lo) if neg else lo, SIG_SHIFT, neg


def valu(a: int, b: int, m: int, c: int, s: int, mode: Mode = Mode.ROUND,
         out: Out = Out.SAT16, lut=None) -> int:
    """One element through the VALU (see the module docstring). In SIGMOID mode only ``a``
    (the input, int16) is used and the result is ``arith.sigmoid_q(a)`` (U16)."""
    if mode == Mode.SIGMOID:
        _check("a", a, -(1 << 15), (1 << 15) - 1)
        a, b, m, c, s, neg = sigmoid_operands(a, lut)
        q = arith.rshift_round(a * b * m, s)
        return min(max(c - q if neg else c + q, 0), 0xFFFF)
    _check("a", a, -(1 << (A_BITS - 1)), (1 << (A_BITS - 1)) - 1)
    _check("b", b, -(1 << (B_BITS - 1)), (1 << (B_BITS - 1)) - 1)
    _check("m", m, 0, (1 << M_BITS) - 1)
    _check("c", c, -(1 << (C_BITS - 1)), (1 << (C_BITS - 1)) - 1)
    _check("s", s, 0, (1 << S_BITS) - 1)
    p = int(a) * int(b) * int(m)
    if mode == Mode.ROUND:
        q = arith.rshift_round(p, s) if s else p
    elif mode == Mode.TRUNC:
        if s > TRUNC_MAX_SHIFT:
            raise ValueError(f"TRUNC needs s <= {TRUNC_MAX_SHIFT}, not {s}")
        q = -((-p) >> s) if p < 0 else p >> s
    else:
        raise ValueError(f"unknown VALU mode {mode!r}")
    y = c + q
    if out == Out.SAT16:
        return arith.sat16(y)
    return min(max(y, 0), 0xFFFF)


# --------------------------------------------------------------------------- microcode

class Base(IntEnum):
    """Where a sub-pass's scratch vector starts: one of the instruction's scratch operands
    (``OP0``.. in the order of ``OPERAND_FIELDS``) or a temporary vector at the top of scratch
    (``T1``..``T3``, ``TEMP_VECTORS`` of ``max(max_d, max_inter)`` words each)."""
    NONE = 0
    OP0 = 1
    OP1 = 2
    OP2 = 3
    DST = 4
    T1 = 5
    T2 = 6
    T3 = 7


TEMP_VECTORS = 3


class ASrc(IntEnum):
    X = 0            # scratch vector X
    W = 1            # the weight-memory vector (int16, or int8 for EMBED)
    H = 2            # MLGRU state of the instruction's layer
    ACC = 3          # the ternary core's sums (BITLINEAR's drain)
    H_MINUS_X = 4    # state - X (17 bits)
    Q15_MINUS_W = 5  # 2**15 - W (W read as uint16)


class BSrc(IntEnum):
    ONE = 0
    W = 1            # the weight-memory vector, int16
    Y = 2            # scratch vector Y
    RESCALE = 3      # 2 when BITLINEAR's z < 0, else 1


class MSrc(IntEnum):
    ONE = 0
    X = 1            # scratch X read as uint16
    Y = 2            # scratch Y read as uint16
    MANT = 3         # NormStats' mant (NORM)
    SCALE = 4        # EMBED's row scale
    QM = 5           # BITLINEAR: 2**-sh when sh < 0, else 1
    RECIP = 6        # BITLINEAR: (127 << 23) // mvn
    S = 7            # BITLINEAR: the rescale factor S
    OPM = 8          # 2**-op_shift when the instruction's shift is negative (a left shift), else 1


class CSrc(IntEnum):
    ZERO = 0
    X = 1
    Y = 2
    W = 3            # the weight-memory vector read as uint16


class ShiftSrc(IntEnum):
    CONST = 0        # the sub-pass's ``shift_const``
    OP = 1           # max(op_shift, 0) of the instruction's shift op_shift (EMBED emb_shift,
                     # RESADD shift, GLU 20 - u_frac, MLGRU g_frac + 10 - o_frac >= -5)
    NORM = 2         # NORM: e + frac_diff
    QS = 3           # BITLINEAR: max(sh, 0)
    Z = 4            # BITLINEAR: min(max(z, 0), 63)


class Dst(IntEnum):
    NONE = 0
    SCRATCH = 1      # at ``dst_base`` + j
    STATE = 2        # the MLGRU state of the instruction's layer
    ACT = 3          # BITLINEAR's activation buffer (int8)


class Reduce(IntEnum):
    NONE = 0
    STATS = 1        # X into NormStats (sum of squares) only
    STATS_ABSMAX = 2  # X into NormStats, and the VALU tracks max|a·b·m| (the quantizer's mv)


class WKind(IntEnum):
    NONE = 0
    W16 = 1          # int16/uint16 vector at the instruction's weight address
    W8 = 2           # int8 row (EMBED)


@dataclass(frozen=True)
class SubPass:
    """One pass of ``n`` elements (the instruction's element count; ``rows`` for the
    BITLINEAR drain) through the VALU."""
    name: str
    x: Base = Base.NONE
    y: Base = Base.NONE
    w: WKind = WKind.NONE
    a: ASrc = ASrc.X
    b: BSrc = BSrc.ONE
    m: MSrc = MSrc.ONE
    c: CSrc = CSrc.ZERO
    shift: ShiftSrc = ShiftSrc.CONST
    shift_const: int = 0
    mode: Mode = Mode.ROUND
    out: Out = Out.SAT16
    dst: Dst = Dst.SCRATCH
    dst_base: Base = Base.DST
    reduce: Reduce = Reduce.NONE
    cond_lb: bool = False          # runs only when the MLGRU instruction has a lower bound
    valu: bool = True              # the VALU takes the elements (False: STATS only)


_Q15 = 15
SP = SubPass

#: The sub-passes of every element-wise macro-op, in order. Operand slots (Base.OP0..) are
#: the instruction's scratch sources as named in OPERAND_FIELDS; BITLINEAR's core phase runs
#: between its "act" and "drain" sub-passes.
MICROCODE: dict[str, list[SubPass]] = {
    "EMBED": [SP("embed", w=WKind.W8, a=ASrc.W, m=MSrc.SCALE, shift=ShiftSrc.OP)],
    "NORM": [
        SP("stats", x=Base.OP0, reduce=Reduce.STATS, valu=False, dst=Dst.NONE),
        SP("apply", x=Base.OP0, w=WKind.W16, a=ASrc.X, b=BSrc.W, m=MSrc.MANT, shift=ShiftSrc.NORM),
    ],
    "RESADD": [SP("add", x=Base.DST, y=Base.OP0, c=CSrc.Y, shift=ShiftSrc.OP)],
    "GLU": [
        SP("sigma", x=Base.OP0, mode=Mode.SIGMOID, out=Out.U16, dst_base=Base.T1),
        SP("silu", x=Base.OP0, y=Base.T1, m=MSrc.Y, shift_const=_Q15, dst_base=Base.T1),
        SP("mul", x=Base.T1, y=Base.OP1, b=BSrc.Y, m=MSrc.OPM, shift=ShiftSrc.OP),
    ],
    "MLGRU": [
        SP("sigma_f", x=Base.OP1, mode=Mode.SIGMOID, out=Out.U16, dst_base=Base.T1),
        SP("lower_bound", x=Base.T1, w=WKind.W16, a=ASrc.Q15_MINUS_W, m=MSrc.X, c=CSrc.W,
           shift_const=_Q15, out=Out.U16, dst_base=Base.T1, cond_lb=True),
        SP("sigma_i", x=Base.OP0, mode=Mode.SIGMOID, out=Out.U16, dst_base=Base.T2),
        SP("silu_i", x=Base.OP0, y=Base.T2, m=MSrc.Y, shift_const=_Q15, dst_base=Base.T2),
        SP("update", x=Base.T2, y=Base.T1, a=ASrc.H_MINUS_X, m=MSrc.Y, c=CSrc.X,
           shift_const=_Q15, dst=Dst.STATE),
        SP("sigma_h", a=ASrc.H, mode=Mode.SIGMOID, out=Out.U16, dst_base=Base.T3),
        SP("silu_h", x=Base.T3, a=ASrc.H, m=MSrc.X, shift_const=_Q15, dst_base=Base.T3),
        SP("out", x=Base.T3, y=Base.OP2, b=BSrc.Y, m=MSrc.OPM, shift=ShiftSrc.OP),
    ],
    "BITLINEAR": [
        SP("stats_absmax", x=Base.OP0, w=WKind.W16, b=BSrc.W, reduce=Reduce.STATS_ABSMAX,
           dst=Dst.NONE),
        SP("normalize", x=Base.OP0, w=WKind.W16, b=BSrc.W, m=MSrc.QM, shift=ShiftSrc.QS,
           mode=Mode.TRUNC, dst_base=Base.T1),
        SP("act", x=Base.T1, m=MSrc.RECIP, shift_const=arith.QUANT_SHIFT, dst=Dst.ACT),
        SP("drain", a=ASrc.ACC, b=BSrc.RESCALE, m=MSrc.S, shift=ShiftSrc.Z),
    ],
}

#: The scratch operands of each macro-op in slot order (Base.OP0, OP1, OP2).
OPERAND_FIELDS = {
    "EMBED": (), "NORM": ("src",), "RESADD": ("src",), "GLU": ("gate_src", "up_src"),
    "MLGRU": ("i_src", "f_src", "gn_src"), "BITLINEAR": ("src",),
}


# --------------------------------------------------------------------------- BitLinear scalars

@dataclass(frozen=True)
class BitLinearScalars:
    """What BITLINEAR needs between its statistics pass and its quantize passes."""
    sh: int
    qm: int          # 2**-sh when sh < 0, else 1
    qs: int          # max(sh, 0)
    recip: int       # (127 << 23) // mvn, 0 when mvn == 0
    s: int           # rescale factor S (0 when mvn == 0)
    z: int           # its shift
    zs: int          # min(max(z, 0), 63)
    zb: int          # 2 when z < 0, else 1


def bitlinear_scalars(mv: int, mant: int, e: int, gamma_mant: int, scale_exp: int) -> BitLinearScalars:
    """From ``mv = max|x·g|`` and the statistics ``(mant, e)``: the quantizer's ``sh``,
    ``mvn`` and reciprocal (``arith.quantize_activations``) and ``arith.rescale_factor``."""
    if mv == 0:
        sh, mvn, recip = 0, 0, 0
    else:
        sh = mv.bit_length() - arith.QUANT_BITS
        mvn = mv >> sh if sh >= 0 else mv << -sh
        recip = (arith.ACT_MAX << arith.QUANT_SHIFT) // mvn
    s, z = arith.rescale_factor(mvn, sh, mant, e, gamma_mant, scale_exp)
    return BitLinearScalars(sh=sh, qm=1 << max(-sh, 0), qs=max(sh, 0), recip=recip, s=s, z=z,
                            zs=min(max(z, 0), 63), zb=2 if z < 0 else 1)


# --------------------------------------------------------------------------- reference run

@dataclass
class Operands:
    """What a macro-op's sub-passes read besides scratch: the weight vector ``w``, the state
    row ``h`` (MLGRU), per-op registers and, for BITLINEAR, the trits."""
    n: int
    w: np.ndarray | None = None
    h: np.ndarray | None = None
    op_shift: int = 0
    scale: int = 0
    eps_q: int = 1
    frac_diff: int = 0
    has_lb: bool = False
    gamma_mant: int = 0
    scale_exp: int = 0
    trits: np.ndarray | None = None
    rows: int = 0
    regs: dict = field(default_factory=dict)


def run_microcode(op: str, scratch: dict, ops: Operands, lut=None) -> dict:
    """Execute ``MICROCODE[op]`` element by element with :func:`valu`.

    ``scratch`` maps Base slots (OP0.., DST, T1..) to int arrays (read and written in place;
    a missing temp is created). Returns the register values (mant, e, mv, BitLinear scalars)
    for inspection; the state row ``ops.h`` is updated in place."""
    regs = ops.regs
    for sp in MICROCODE[op]:
        if sp.cond_lb and not ops.has_lb:
            continue
        if sp.name == "drain":                          # BITLINEAR: the core, then the drain
            acc = arith.ternary_accumulate(ops.trits, scratch["act"])
            n = ops.rows
        else:
            n = ops.n
        if sp.dst == Dst.SCRATCH and sp.dst_base not in scratch:
            scratch[sp.dst_base] = np.zeros(n, np.int64)
        if sp.dst == Dst.ACT:
            scratch["act"] = np.zeros(n, np.int64)
        xs = scratch.get(sp.x)
        ys = scratch.get(sp.y)
        if sp.reduce in (Reduce.STATS, Reduce.STATS_ABSMAX):
            regs["mant"], regs["e"] = arith.norm_stats(np.asarray(xs[:n]), ops.eps_q)
        mv = 0
        results = []
        for j in range(n):
            x = int(xs[j]) if xs is not None else None
            y = int(ys[j]) if ys is not None else None
            w = int(ops.w[j]) if ops.w is not None and sp.w != WKind.NONE else None
            a = {ASrc.X: x, ASrc.W: w, ASrc.H: None if ops.h is None else int(ops.h[j]),
                 ASrc.ACC: None if sp.name != "drain" else int(acc[j]),
                 ASrc.H_MINUS_X: None if ops.h is None else int(ops.h[j]) - (x or 0),
                 ASrc.Q15_MINUS_W: None if w is None else arith.ONE_Q15 - (w & 0xFFFF)}[sp.a]
            if not sp.valu:
                continue
            b = {BSrc.ONE: 1, BSrc.W: w, BSrc.Y: y,
                 BSrc.RESCALE: regs.get("zb", 1)}[sp.b]
            m = {MSrc.ONE: 1, MSrc.X: None if x is None else x & 0xFFFF,
                 MSrc.Y: None if y is None else y & 0xFFFF, MSrc.MANT: regs.get("mant"),
                 MSrc.SCALE: ops.scale, MSrc.QM: regs.get("qm"), MSrc.RECIP: regs.get("recip"),
                 MSrc.S: regs.get("s"), MSrc.OPM: 1 << max(-ops.op_shift, 0)}[sp.m]
            c = {CSrc.ZERO: 0, CSrc.X: x, CSrc.Y: y,
                 CSrc.W: None if w is None else w & 0xFFFF}[sp.c]
            s = {ShiftSrc.CONST: sp.shift_const, ShiftSrc.OP: max(ops.op_shift, 0),
                 ShiftSrc.NORM: regs.get("e", 0) + ops.frac_diff, ShiftSrc.QS: regs.get("qs"),
                 ShiftSrc.Z: regs.get("zs")}[sp.shift]
            if sp.reduce == Reduce.STATS_ABSMAX:
                mv = max(mv, abs(a * b * m))
                continue
            results.append(valu(a, b, m, c, s, sp.mode, sp.out, lut))
        if sp.reduce == Reduce.STATS_ABSMAX:
            regs["mv"] = mv
            sc = bitlinear_scalars(mv, regs["mant"], regs["e"], ops.gamma_mant, ops.scale_exp)
            regs.update(sc.__dict__)
        if not results:
            continue
        vals = np.asarray(results, dtype=np.int64)
        if sp.dst == Dst.SCRATCH:
            # scratch words are 16 bits: U16 results are stored as their bit pattern
            scratch[sp.dst_base][:n] = np.where(vals > 32767, vals - 65536, vals)
        elif sp.dst == Dst.STATE:
            ops.h[:n] = vals
        elif sp.dst == Dst.ACT:
            scratch["act"][:n] = vals
    return regs
