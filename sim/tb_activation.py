"""cocotb testbench of hdl/activation.py (run from tests/test_activation.py through
``run_cocotb``), plus the input generators both test levels use.

Parameters (``tb_params()``): ``unit`` ("sigmoid_silu" or "glu": which toplevel was built; the
other unit's tests are skipped), ``seed``.
"""

import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge

from mmfree.hdl.activation import (GLUInput, GLUOutput, SigmoidSiLUInput, SigmoidSiLUOutput)
from mmfree.models import arith
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.cocotb_streams import StreamSink, StreamSource

__all__ = ["EDGE_X", "edge_and_random_x", "glu_triples", "expected_sigmoid_silu", "expected_glu"]

# int16 values where the sigmoid datapath changes behaviour: 0 and ±1, table steps (multiples
# of 64) and their neighbours, the saturation point 2**14 - 1 = 16383 (16.0) and around it,
# the first index whose table entry is 2**15, and the int16 ends (|-32768| = 32768).
_FIRST_ONE = int(np.argmax(arith.sigmoid_lut() == arith.ONE_Q15)) << arith.SIG_STEP_BITS
EDGE_X = sorted({v * s for v in (0, 1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 1024, 4095, 4096,
                                 8191, 8192, 16320, 16382, 16383, 16384, 16385, 20000,
                                 _FIRST_ONE - 1, _FIRST_ONE, 32767) for s in (1, -1)} | {-32768})


def edge_and_random_x(rng: random.Random, count: int) -> list[int]:
    """Every edge value, then ``count`` random int16 values (half uniform, half within ±16)."""
    xs = list(EDGE_X)
    for i in range(count):
        xs.append(rng.randint(-32768, 32767) if i % 2 else rng.randint(-16384, 16384))
    return xs


def glu_triples(rng: random.Random, count: int) -> list[tuple[int, int, int]]:
    """(gate, up, u_frac): edge gates with extreme and ordinary ups and the extreme and a
    random u_frac, then random triples."""
    ups = (-32768, -32767, -1, 0, 1, 1024, 32767)
    triples = [(g, u, f) for g in EDGE_X for u in ups for f in (0, 15, rng.randrange(16))]
    for i in range(count):
        big = i % 3 == 0
        triples.append((rng.randint(-32768, 32767) if big else rng.randint(-8192, 8192),
                        rng.randint(-32768, 32767) if big or i % 3 == 1
                        else rng.randint(-4096, 4096),
                        rng.randrange(16)))
    return triples


def expected_sigmoid_silu(xs) -> list[dict]:
    x = np.asarray(xs, dtype=np.int64)
    return [{"sigma": int(s), "silu": int(u)} for s, u in zip(arith.sigmoid_q(x), arith.silu_q(x))]


def expected_glu(triples) -> list[int]:
    """``arith.glu`` element by element (u_frac is a per-call scalar there)."""
    return [int(arith.glu(np.array([g]), np.array([u]), f)[0]) for g, u, f in triples]


# --------------------------------------------------------------------------- cocotb testbench

UNIT = tb_params().get("unit")


async def _start(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    await RisingEdge(dut.clk)


async def _run(dut, in_layout, out_layout, beats, idle, stall, salt):
    seed = tb_params()["seed"] * 100 + salt
    dut._log.info(f"seed {seed}")
    src = StreamSource(dut, "i_stream", in_layout, dut.clk, idle=idle, rng=random.Random(seed))
    sink = StreamSink(dut, "o_stream", out_layout, dut.clk, stall=stall,
                      rng=random.Random(seed + 1))
    await _start(dut)
    sink.start()
    await src.send(beats)
    got = await sink.wait_for(len(beats), timeout_cycles=20 * len(beats) + 100)
    await ClockCycles(dut.clk, 30)
    assert len(sink.items) == len(beats), f"{len(sink.items) - len(beats)} extra outputs"
    return got


FLOWS = [(0.0, 0.0), (0.3, 0.3), (0.1, 0.7)]


@cocotb.test(skip=UNIT != "sigmoid_silu")
@cocotb.parametrize(flow=FLOWS)
async def test_sigmoid_silu(dut, flow):
    """Edge and random x, with idle gaps and back-pressure (idle, stall): σ, silu, last."""
    salt = int(flow[0] * 10 + flow[1] * 100)
    xs = edge_and_random_x(random.Random(tb_params()["seed"] + salt), 2000)
    beats = [{"x": x, "last": int(k % 7 == 6)} for k, x in enumerate(xs)]
    got = await _run(dut, SigmoidSiLUInput(), SigmoidSiLUOutput(), beats, *flow, salt)
    for k, (x, want, out) in enumerate(zip(xs, expected_sigmoid_silu(xs), got)):
        assert out == dict(want, last=beats[k]["last"]), \
            f"element {k}, x = {x}: got {out}, want {want}"


@cocotb.test(skip=UNIT != "glu")
@cocotb.parametrize(flow=FLOWS)
async def test_glu(dut, flow):
    """Edge gates × extreme ups × u_frac, random triples, with idle gaps and back-pressure."""
    salt = int(flow[0] * 10 + flow[1] * 100)
    triples = glu_triples(random.Random(tb_params()["seed"] + salt), 1500)
    beats = [{"gate": g, "up": u, "u_frac": f, "last": int(k % 5 == 4)}
             for k, (g, u, f) in enumerate(triples)]
    got = await _run(dut, GLUInput(), GLUOutput(), beats, *flow, salt)
    for k, (tri, want, out) in enumerate(zip(triples, expected_glu(triples), got)):
        assert out == {"u": want, "last": beats[k]["last"]}, \
            f"element {k}, {tri}: got {out}, want {want}"
