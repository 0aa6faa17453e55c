# amaranth: UnusedElaboratable=no
"""Tests of hdl/accelerator.py: the sequencer, the memories and the units together run device
images of random models, bit for bit against the firmware interpreter and the integer golden
model (next token and every logit, across tokens and state resets), with exactly the cycles
of the firmware's cost model (per instruction). Amaranth simulator, and cocotb + Icarus on a
tiny model."""

import random
from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from mmfree.firmware.image import build_image
from mmfree.firmware.program import ScratchMap
from mmfree.firmware.interpreter import CostModel, Interpreter, program_cost
from mmfree.firmware.isa import (HEADER_WORDS, ICEBREAKER, ISA_VERSION, WORD_BYTES, ArgMax,
                                 Embed, Halt, HardwareConfig, ImageHeader, ResAdd,
                                 encode_program, row_words, vector_words)
from mmfree.hdl.accelerator import AcceleratorCore, core_members, expected_header_bytes
from mmfree.hdl.memory import ScratchMemory, WeightMemory
from mmfree.hdl.sequencer import OPERAND_STAGES, CoreUnits, Sequencer, program_cycles
from mmfree.models import arith
from mmfree.models.boardfile import read_board_model
from mmfree.models.config import ModelConfig
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import quantize_model
from mmfree.sim.amaranth_streams import stream_get, stream_put, stream_put_all
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb

ROOT = Path(__file__).resolve().parents[1]
RESET = "reset"


def small_hw(lanes, V, d, L, I):
    """A configuration just large enough for the model (small memories: fast to simulate):
    the program's scratch buffers plus the core's temporary vectors."""
    scratch = ScratchMap.for_dims(d, I, V).words + 3 * max(d, I)
    return HardwareConfig(lanes=lanes, max_d=d, max_inter=I, max_vocab=V, max_layers=L,
                          weight_words=1 << 12, scratch_words=max(512, scratch),
                          program_words=2 * (13 * L + 5))


def build(make_tensors, V, d, L, I, lanes, seed):
    print(f"model V{V} d{d} L{L} I{I} lanes={lanes}: seed {seed}")
    cfg = ModelConfig(V, d, L, I, use_lower_bound=True)
    qm = quantize_model(cfg, make_tensors(cfg, seed), lanes=lanes)
    hw = small_hw(lanes, V, d, L, I)
    return qm, hw, build_image(qm, hw)


def expected_events(qm, hw, data, script):
    """Run ``script`` (tokens and RESET) on the interpreter and, given a model ``qm``, the
    golden model; both must agree. Returns per token: next, logits, cycles and busy (this
    sequencer's cycles, from ``program_cycles``) and the per-instruction cycles."""
    interp = Interpreter(data, hw)
    gm = IntegerModel(qm) if qm is not None else None
    state = gm.new_state() if gm else None
    costs = program_cycles(interp.program, hw)
    events = []
    for ev in script:
        if ev == RESET:
            interp.reset_state()
            state = gm.new_state() if gm else None
            events.append(RESET)
            continue
        logits, nxt = interp.step(ev)
        if gm:
            want, state = gm.step(ev, state)
            assert np.array_equal(logits, want) and nxt == arith.argmax(want)
        assert interp.last_core_busy == sum(b for _, b in costs)
        events.append({"token": ev, "next": nxt, "logits": [int(v) for v in logits],
                       "cycles": sum(c for c, _ in costs), "busy": interp.last_core_busy,
                       "per_insn": [c for c, _ in costs]})
    return events


def simulate(hw, data, V, script, seed):
    """Drive an AcceleratorCore in the Amaranth simulator: load image ``data`` (random gaps), set
    model_ok, run ``script`` (random start gaps, random done back-pressure, state resets), read
    all logits after each token in random order. Returns per token {next, cycles, busy, logits,
    fetches} where ``fetches`` are the cycles of the token's instruction fetches and of done."""
    dut = AcceleratorCore(hw)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    rng = random.Random(seed)
    out = []
    trace = {"cycle": 0, "fetches": None, "done_seen": False}

    async def monitor(ctx):
        async for _, _, fetching, dvalid, svalid, sready in ctx.tick().sample(
                dut.seq.fetching, dut.done.valid, dut.start.valid, dut.start.ready):
            trace["cycle"] += 1
            if svalid and sready:
                trace["fetches"] = []
                trace["done_seen"] = False
            if fetching:
                trace["fetches"].append(trace["cycle"])
            if dvalid and not trace["done_seen"]:
                trace["fetches"].append(trace["cycle"])
                trace["done_seen"] = True

    async def bench(ctx):
        assert not ctx.get(dut.header_ok) and not ctx.get(dut.start.ready)
        await stream_put_all(ctx, dut.load, [{"addr": a, "data": b} for a, b in enumerate(data)],
                             idle=0.2, rng=rng)
        await ctx.tick()
        assert ctx.get(dut.header_ok) and ctx.get(dut.vocab_size) == V
        assert not ctx.get(dut.start.ready), "no token may start before model_ok"
        ctx.set(dut.model_ok, 1)
        while not ctx.get(dut.ready_state):
            await ctx.tick()
        for ev in script:
            if ev == RESET:
                ctx.set(dut.reset_state, 1)
                await ctx.tick()
                ctx.set(dut.reset_state, 0)
                assert not ctx.get(dut.ready_state), "ready_state must drop after the strobe"
                n = 0
                while not ctx.get(dut.ready_state):
                    await ctx.tick()
                    n += 1
                assert n >= hw.max_layers * hw.max_d
                continue
            for _ in range(rng.randrange(4)):
                await ctx.tick()
            await stream_put(ctx, dut.start, {"token": ev})
            assert not ctx.get(dut.load.ready) and not ctx.get(dut.start.ready)
            for _ in range(rng.randrange(5)):           # done waits for the link
                await ctx.tick()
            res = await stream_get(ctx, dut.done)
            logits = {}
            for k in rng.sample(range(V), V):
                ctx.set(dut.logit_addr, k)
                await ctx.tick()
                logits[k] = ctx.get(dut.logit_data)
            out.append({"next": res.next_token, "cycles": res.cycles, "busy": res.busy,
                        "logits": [logits[k] for k in range(V)], "fetches": trace["fetches"]})

    sim.add_testbench(monitor, background=True)
    sim.add_testbench(bench)
    sim.run()
    return out


def check(events, got):
    tokens = [ev for ev in events if ev != RESET]
    assert len(got) == len(tokens)
    for k, (want, res) in enumerate(zip(tokens, got)):
        where = f"token {k} ({want['token']})"
        assert res["logits"] == want["logits"], f"{where}: logits differ"
        assert res["next"] == want["next"], f"{where}: next token"
        per_insn = [b - a for a, b in zip(res["fetches"], res["fetches"][1:])]
        assert per_insn == want["per_insn"], f"{where}: cycles per instruction"
        assert (res["cycles"], res["busy"]) == (want["cycles"], want["busy"]), where


# (V, d, L, I, lanes): partial last row groups (V, d, I not multiples of the lanes), cols both
# above and equal to the lanes (TernaryCore's group gap), two layers with lower bounds, and a
# 256-column down_proj (its normalize pass, not the scalars unit, decides when its act pass
# starts: the other branch of the cost model)
SHAPES = [(40, 16, 1, 20, 16), (52, 28, 2, 24, 8), (20, 16, 1, 256, 16)]


@pytest.mark.parametrize("V,d,L,I,lanes", SHAPES)
def test_tokens_match_interpreter_and_golden(make_tensors, V, d, L, I, lanes):
    seed = 31 * V + d
    qm, hw, image = build(make_tensors, V, d, L, I, lanes, seed)
    rng = np.random.default_rng(seed)
    print(f"tokens seed {seed}")
    script = [0, V - 1] + rng.integers(0, V, 2).tolist() + [RESET] + rng.integers(0, V, 2).tolist()
    events = expected_events(qm, hw, image.data, script)
    got = simulate(hw, image.data, V, script, seed)
    check(events, got)
    # the sequencer's documented cycles are the firmware's cost model plus its differences
    print("cycles/token", events[0]["cycles"], "busy", events[0]["busy"])


def test_program_cycles_are_the_cost_model(make_tensors):
    """program_cycles (which the simulations above measure) is the firmware's CostModel: the
    units' latencies are the model's, instruction by instruction; the shipped model's figure."""
    shipped = read_board_model(ROOT / "models/shipped/tiny-fortunes/tiny-fortunes.mmf")
    images = [(build_image(shipped, ICEBREAKER), ICEBREAKER)]
    for V, d, L, I, lanes in SHAPES:
        qm, hw, image = build(make_tensors, V, d, L, I, lanes, 31 * V + d)
        images.append((image, hw))
    for image, hw in images:
        units = CoreUnits(hw)
        cm = CostModel.for_hw(hw)
        assert (cm.valu, cm.stats, cm.scalars, cm.operand) == (
            units.valu.latency, units.stats.latency, units.scalars.max_cycles, OPERAND_STAGES)
        ours = program_cycles(image.program, hw)
        model = program_cost(image.program, hw)
        assert [(c.cycles, c.core_busy) for c in model] == ours
    ours = sum(c for c, _ in program_cycles(images[0][0].program, ICEBREAKER))
    busy = sum(b for _, b in program_cycles(images[0][0].program, ICEBREAKER))
    print(f"shipped model: {ours} cycles/token, core busy {busy} ({ours / busy:.2f}x the ideal)")


def handmade_image(hw, program, tables: list[tuple[int, bytes]], vocab: int, logits_addr: int,
                   d: int) -> bytes:
    """A device image for ``hw`` with ``program`` at word HEADER_WORDS and each (word, bytes)
    of ``tables`` in place."""
    end = max([HEADER_WORDS + 2 * len(program)] + [w + -(-len(b) // WORD_BYTES) for w, b in tables])
    data = bytearray(end * WORD_BYTES)
    code = encode_program(program, hw)
    data[HEADER_WORDS * WORD_BYTES:HEADER_WORDS * WORD_BYTES + len(code)] = code
    for word, blob in tables:
        data[word * WORD_BYTES:word * WORD_BYTES + len(blob)] = blob
    header = ImageHeader(isa_version=ISA_VERSION, arith_version=arith.ARITH_VERSION, lanes=hw.lanes,
                         n_layers=1, vocab=vocab, d=d, inter=1, program_length=len(program),
                         image_length=len(data), config_hash=hw.config_hash,
                         logits_addr=logits_addr, program_addr=HEADER_WORDS)
    data[:32] = header.pack()
    return bytes(data)


def test_embed_resadd_argmax_edges():
    """EMBED (the VALU with m = the row scale) at int8 extremes, scales up to 65535 and shifts 0 and 24;
    RESADD chains with shifts 15, 7, 1, 0 that saturate both ways; ARGMAX over saturated
    (tied) values: a hand-made program whose 'logits' are the residual vector."""
    seed = 77
    print("seed", seed)
    rng = np.random.default_rng(seed)
    n = V = 32
    hw = small_hw(8, V, n, 1, 16)
    rows = rng.integers(-128, 128, (2, V, n))
    rows[:, 0] = 127
    rows[:, 1] = -128
    rows[:, 2, ::2] = -128
    rows[:, 2, 1::2] = 127
    rows[:, 3] = 0
    rows[1, 4] = rows[0, 4]                          # delta = r: ties everywhere after saturation
    scales = rng.integers(0, 1 << 16, (2, V))
    scales[:, :3] = 65535
    scales[:, 5] = 1
    t_a, t_b = 64, 64 + V * row_words(n)
    s_a, s_b = t_b + V * row_words(n), t_b + V * row_words(n) + vector_words(V)
    tables = [(t_a, rows[0].astype(np.int8).tobytes()), (t_b, rows[1].astype(np.int8).tobytes()),
              (s_a, scales[0].astype("<u2").tobytes()), (s_b, scales[1].astype("<u2").tobytes())]
    a, b = 0, 64
    program = [Embed(dst=a, n=n, table_addr=t_a, scale_addr=s_a, emb_shift=8),
               Embed(dst=b, n=n, table_addr=t_b, scale_addr=s_b, emb_shift=0),
               ResAdd(dst=a, src=b, n=n, shift=15), ResAdd(dst=a, src=b, n=n, shift=7),
               Embed(dst=b, n=n, table_addr=t_b, scale_addr=s_b, emb_shift=24),
               ResAdd(dst=a, src=b, n=n, shift=1),
               Embed(dst=b, n=n, table_addr=t_b, scale_addr=s_b, emb_shift=0),
               ResAdd(dst=a, src=b, n=n, shift=0), ArgMax(src=a, n=n), Halt()]
    data = handmade_image(hw, program, tables, V, a, n)
    script = [0, 1, 2, 3, 4, 5] + rng.integers(6, V, 3).tolist()
    events = expected_events(None, hw, data, script)
    logits = np.array([ev["logits"] for ev in events])
    assert (logits == 32767).any() and (logits == -32768).any(), "no saturation exercised"
    check(events, simulate(hw, data, V, script, seed))


def test_program_ends_at_its_length_or_an_unknown_opcode():
    """A program without HALT stops after ``program_length`` instructions; an unknown opcode
    stops it too (never a hang). The interpreter refuses such images, so the expected
    next token is computed with arith directly."""
    seed = 5
    print("seed", seed)
    rng = np.random.default_rng(seed)
    n = V = 16
    hw = small_hw(8, V, n, 1, 16)
    rows = rng.integers(-128, 128, (V, n))
    scales = rng.integers(1, 1 << 16, V)
    t, sc = 64, 64 + V * row_words(n)
    tables = [(t, rows.astype(np.int8).tobytes()), (sc, scales.astype("<u2").tobytes())]
    embed = Embed(dst=0, n=n, table_addr=t, scale_addr=sc, emb_shift=6)
    for tail in ("length", "opcode"):
        program = [embed, ArgMax(src=0, n=n), embed]       # no HALT
        data = bytearray(handmade_image(hw, program, tables, V, 0, n))
        if tail == "opcode":            # a 4th instruction with opcode 9, a length of 6
            data[14:16] = (6).to_bytes(2, "little")
            data[(HEADER_WORDS + 6) * WORD_BYTES] = 9
        script = [3, 11]
        got = simulate(hw, bytes(data), V, script, seed)
        for token, res in zip(script, got):
            r = arith.embed(rows[token], int(scales[token]), 6)
            assert res["logits"] == [int(v) for v in r]
            assert res["next"] == arith.argmax(r)
            assert len(res["fetches"]) == 4 + 1, "three instructions, one refused fetch, done"


def test_header_check(make_tensors):
    """header_ok follows the fixed bytes of the loaded header and its layer count; vocab_size
    follows bytes 8 and 9; a load to address 0 starts a new check."""
    hw = small_hw(8, 40, 16, 1, 16)
    fixed = expected_header_bytes(hw)
    assert bytes(fixed[i] for i in range(4)) == b"MMFI"
    assert fixed[6] == 8 and [fixed[20 + i] for i in range(4)] == list(hw.config_hash.to_bytes(4, "little"))
    good = bytearray(32)
    for a, v in fixed.items():
        good[a] = v
    good[7] = 1                                      # one layer
    good[8:10] = (300).to_bytes(2, "little")
    dut = AcceleratorCore(hw)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    cases = [(bytes(good), True)]
    for a in (0, 4, 5, 6, 20, 23, 31):
        bad = bytearray(good)
        bad[a] ^= 0x10
        cases.append((bytes(bad), False))
    for layers in (0, hw.max_layers + 1):
        bad = bytearray(good)
        bad[7] = layers
        cases.append((bytes(bad), False))
    cases.append((bytes(good), True))               # a good header after bad ones

    async def bench(ctx):
        assert not ctx.get(dut.header_ok)
        for data, ok in cases:
            for a, b in enumerate(data):
                await stream_put(ctx, dut.load, {"addr": a, "data": b})
            await ctx.tick()
            assert ctx.get(dut.header_ok) == ok, data.hex()
            assert ctx.get(dut.vocab_size) == 300

    sim.add_testbench(bench)
    sim.run()


def test_ports_and_errors():
    hw = ICEBREAKER
    members = core_members(hw)
    assert set(members) == {"load", "start", "done", "reset_state", "ready_state", "logit_addr",
                            "logit_data", "model_ok", "vocab_size", "header_ok"}
    try:
        from mmfree.hdl.link import core_port_members
    except ImportError:         # the link layer is not there: nothing to compare with
        core_port_members = None
    if core_port_members is not None:
        theirs = core_port_members(hw.weight_bytes, hw.max_vocab)
        for name, member in theirs.items():
            assert members[name] == member, f"port {name} differs from the link's"
    with pytest.raises(ValueError, match="needs a firmware.isa.HardwareConfig"):
        AcceleratorCore({"lanes": 32})
    with pytest.raises(ValueError, match="weight_words=16384"):
        WeightMemory(HardwareConfig(weight_words=4096), spram=True)
    with pytest.raises(ValueError, match="needs a firmware.isa.HardwareConfig"):
        ScratchMemory(None)
    with pytest.raises(ValueError, match="needs a firmware.isa.HardwareConfig"):
        Sequencer("icebreaker", CoreUnits(hw))
    with pytest.raises(ValueError, match="leaves no scratch"):
        HardwareConfig(scratch_words=768)


def test_spram_build_elaborates():
    """The SPRAM weight memory elaborates into four SB_SPRAM256KA (synthesis: hdl/synth.py)."""
    from amaranth.back import rtlil
    text = rtlil.convert(WeightMemory(ICEBREAKER, spram=True), name="wmem")
    assert text.count("SB_SPRAM256KA") == 4


@pytest.mark.skipif(not icarus_available(), reason=ICARUS_MISSING)
def test_cocotb(make_tensors, tmp_path):
    V, d, L, I, lanes = 24, 16, 1, 16, 8
    seed = 4242
    qm, hw, image = build(make_tensors, V, d, L, I, lanes, seed)
    script = [3, V - 1, RESET, 5]
    events = expected_events(qm, hw, image.data, script)
    params = {"memory_bytes": hw.weight_bytes, "image": image.data.hex(), "vocab": V,
              "max_state": hw.max_layers * hw.max_d, "seed": seed,
              "events": [ev if ev == RESET else {k: ev[k] for k in ("token", "next", "cycles", "busy", "logits")}
                         for ev in events]}
    run_cocotb(AcceleratorCore(hw), "accelerator_core", "mmfree.sim.tb_accelerator", tmp_path,
               params=params, seed=seed)
