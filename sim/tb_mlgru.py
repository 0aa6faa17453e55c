"""cocotb testbench of hdl/mlgru.py (run from tests/test_mlgru.py through ``run_cocotb``), plus
the pure-Python token generators and reference loop both test levels use.

A test is a list of *events*: a token (dict: ``layer``, ``has_lb``, ``g_frac``, ``o_frac`` and
the lists ``i_pre``, ``f_pre``, ``gn``, ``lb``, one entry per channel) or :data:`RESET` (a state
reset request). :func:`expected_outputs` runs them through the arith functions with one state
vector per layer; :func:`beats` turns a token into the unit's input elements.

Parameters (``tb_params()``): ``max_d``, ``max_layers``, ``seed``.
"""

import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge

from mmfree.hdl.mlgru import MLGRUInput, MLGRUOutput
from mmfree.models import arith
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.cocotb_streams import StreamSink, StreamSource

__all__ = ["RESET", "random_token", "edge_tokens", "random_events", "expected_outputs", "beats",
           "INT16_EDGES", "LB_EDGES"]

RESET = "reset"
INT16_EDGES = (-32768, -32767, -16385, -16384, -1, 0, 1, 16383, 16384, 32767)
LB_EDGES = (0, 1, 16384, 32767, 32768)       # Q1.15 lower bounds: none, tiny, half, ~1, 1


def _pre(rng: random.Random) -> int:
    """A projection output: mostly within ±8 (where σ is not saturated), sometimes anything."""
    if rng.random() < 0.2:
        return rng.randint(-32768, 32767)
    return max(-32768, min(32767, int(rng.gauss(0, 3000))))


def random_token(rng: random.Random, d: int, layer: int, has_lb: bool) -> dict:
    return {"layer": layer, "has_lb": has_lb, "g_frac": rng.randrange(16),
            "o_frac": rng.choice([rng.randrange(16), 9, 9]),
            "i_pre": [_pre(rng) for _ in range(d)], "f_pre": [_pre(rng) for _ in range(d)],
            "gn": [rng.randint(-32768, 32767) if rng.random() < 0.3 else _pre(rng)
                   for _ in range(d)],
            "lb": [rng.choice(LB_EDGES) if rng.random() < 0.2 else rng.randint(0, 32768)
                   for _ in range(d)]}


def edge_tokens(rng: random.Random, max_d: int, layer: int) -> list[dict]:
    """Tokens whose channels take int16 extremes of i_pre, f_pre, gn, every edge lower bound,
    with and without lower bound; the output shift g_frac + PRE_FRAC - o_frac at both ends
    (-5 and 25: a left shift and the largest right shift) and in between."""
    combos = [(i, f, g, lb) for i in INT16_EDGES for f in INT16_EDGES[::3]
              for g in (INT16_EDGES[0], INT16_EDGES[-1], rng.randint(-32768, 32767))
              for lb in (rng.choice(LB_EDGES),)]
    rng.shuffle(combos)
    tokens = []
    for k in range(0, len(combos), max_d):
        chunk = combos[k:k + max_d]
        tokens.append({"layer": layer, "has_lb": bool(k // max_d % 2),
                       "g_frac": (0, 15, rng.randrange(16))[k // max_d % 3],
                       "o_frac": (15, 0, rng.randrange(16))[k // max_d % 3],
                       "i_pre": [c[0] for c in chunk], "f_pre": [c[1] for c in chunk],
                       "gn": [c[2] for c in chunk], "lb": [c[3] for c in chunk]})
    return tokens


def random_events(rng: random.Random, n_tokens: int, max_d: int, max_layers: int, *,
                  full: bool = False, resets: int = 0) -> list:
    """``n_tokens`` tokens of random layers (layer 0 without lower bound, the others with), of
    ``max_d`` channels when ``full`` else of random lengths 1..max_d, with ``resets`` state
    resets at random places in between."""
    events = []
    for _ in range(n_tokens):
        layer = rng.randrange(max_layers)
        d = max_d if full else rng.randint(1, max_d)
        events.append(random_token(rng, d, layer, has_lb=layer > 0))
    for _ in range(resets):
        events.insert(rng.randint(1, len(events) - 1), RESET)
    return events


def expected_outputs(events, max_d: int, max_layers: int) -> list[dict]:
    """Every output element ``{"o", "last"}``: a Python loop over the events with one state
    vector per layer, calling exactly arith.forget_gate, mlgru_update and output_gate."""
    state = np.zeros((max_layers, max_d), dtype=np.int64)
    out = []
    for ev in events:
        if ev == RESET:
            state[:] = 0
            continue
        d, layer = len(ev["i_pre"]), ev["layer"]
        f = arith.forget_gate(np.array(ev["f_pre"]), np.array(ev["lb"]) if ev["has_lb"] else None)
        h = arith.mlgru_update(state[layer, :d], np.array(ev["i_pre"]), f)
        state[layer, :d] = h
        o = arith.output_gate(np.array(ev["gn"]), ev["g_frac"], h, ev["o_frac"])
        out += [{"o": int(v), "last": int(c == d - 1)} for c, v in enumerate(o)]
    return out


def beats(token: dict) -> list[dict]:
    d = len(token["i_pre"])
    return [{"i_pre": token["i_pre"][c], "f_pre": token["f_pre"][c], "gn": token["gn"][c],
             "lb": token["lb"][c], "has_lb": int(token["has_lb"]), "g_frac": token["g_frac"],
             "o_frac": token["o_frac"],
             "layer": token["layer"], "last": int(c == d - 1)} for c in range(d)]


# --------------------------------------------------------------------------- cocotb testbench

class TB:
    """Clock, reset, element source, output sink and reset requests of one MLGRU instance."""

    def __init__(self, dut, idle: float, stall: float, salt: int):
        p = tb_params()
        self.dut = dut
        self.max_d, self.max_layers = p["max_d"], p["max_layers"]
        self.seed = p["seed"] * 1000 + salt
        dut._log.info(f"seed {self.seed}")
        self.rng = random.Random(self.seed)
        self.src = StreamSource(dut, "i_stream", MLGRUInput(self.max_layers), dut.clk, idle=idle,
                                rng=random.Random(self.seed + 1))
        self.sink = StreamSink(dut, "o_stream", MLGRUOutput(), dut.clk, stall=stall,
                               rng=random.Random(self.seed + 2))

    async def start(self):
        cocotb.start_soon(Clock(self.dut.clk, 10, unit="ns").start())
        self.dut.reset_state__valid.value = 0
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 2)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)
        self.sink.start()

    async def request_reset(self):
        self.dut.reset_state__valid.value = 1
        while True:
            await RisingEdge(self.dut.clk)
            if int(self.dut.reset_state__ready.value):
                break
        self.dut.reset_state__valid.value = 0

    async def run(self, events):
        """Send the events in order; compare every output with the reference loop; then check
        that nothing more comes out and the unit is idle."""
        want = expected_outputs(events, self.max_d, self.max_layers)
        n_in = 0
        for ev in events:
            if ev == RESET:
                await self.request_reset()
            else:
                await self.src.send(beats(ev))
                n_in += len(ev["i_pre"])
        got = await self.sink.wait_for(len(want), timeout_cycles=30 * n_in + 1000)
        for k, (w, o) in enumerate(zip(want, got)):
            assert o == w, f"output {k}: got {o}, want {w}"
        await ClockCycles(self.dut.clk, 60)
        extra = len(self.sink.items) - len(want)
        assert extra == 0, f"{extra} extra outputs"
        assert self.src.sent == n_in


FLOWS = [(0.0, 0.0), (0.3, 0.3), (0.1, 0.7)]


@cocotb.test()
@cocotb.parametrize(flow=FLOWS)
async def test_random_layers_interleaved(dut, flow):
    """Tokens of random lengths and layers (interleaved), two state resets, with idle gaps and
    back-pressure."""
    tb = TB(dut, *flow, salt=int(flow[0] * 10 + flow[1] * 100))
    await tb.start()
    await tb.run(random_events(tb.rng, 100, tb.max_d, tb.max_layers, resets=2))


@cocotb.test()
async def test_edges(dut):
    """int16 extremes of i_pre, f_pre, gn; lower bounds 0, 1, 32767, 32768; output shifts -5, 25."""
    tb = TB(dut, 0.2, 0.2, salt=5)
    await tb.start()
    events = []
    for layer in range(tb.max_layers):
        events += edge_tokens(tb.rng, tb.max_d, layer)
    await tb.run(events)


@cocotb.test()
async def test_state_over_tokens_with_resets(dut):
    """50 full tokens per layer, two state resets in between (one right after a token that is
    still in flight), then tokens of a single channel back to back."""
    tb = TB(dut, 0.1, 0.3, salt=6)
    await tb.start()
    events = random_events(tb.rng, 50, tb.max_d, tb.max_layers, full=True, resets=2)
    events += [random_token(tb.rng, 1, 0, False) for _ in range(6)]
    await tb.run(events)
