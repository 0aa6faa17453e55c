"""Firmware: instruction encoding, device images, the program generator and the interpreter.

The interpreter runs an image from its bytes alone; its logits must equal the integer golden
model's for every token, which proves the instruction set, the memory map and the program
together (for the shipped model and for random models of other shapes and lane counts)."""

import zlib
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from mmfree.firmware import assembler, isa
from mmfree.firmware.image import (ImageError, ModelDoesNotFit, build_image,
                                   check_fits, check_image, fits, memory_map)
from mmfree.firmware.interpreter import CostModel, ExecutionError, Interpreter, program_cost
from mmfree.firmware.isa import (ICEBREAKER, GLU, MLGRU, ArgMax, BitLinear, Embed, Halt,
                                 HardwareConfig, Instruction, Norm, Op, ResAdd)
from mmfree.firmware.program import ScratchMap, program_length
from mmfree.models import arith
from mmfree.models.boardfile import pack_trits, read_board_model
from mmfree.models.config import ModelConfig
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import quantize_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models/shipped/tiny-fortunes/tiny-fortunes.mmf"


@pytest.fixture(scope="module")
def shipped():
    return read_board_model(SHIPPED)


@pytest.fixture(scope="module")
def shipped_image(shipped):
    return build_image(shipped, ICEBREAKER)


def small_model(make_tensors, V, d, L, I, lb=True, lanes=16, seed=None, formats=False):
    """A random model; ``formats`` gives fixed formats (no calibration run) for fit tests."""
    seed = 1000 * L + 7 * d + V if seed is None else seed
    print(f"model V{V} d{d} L{L} I{I} lb={lb} lanes={lanes}: seed {seed}")
    cfg = ModelConfig(V, d, L, I, use_lower_bound=lb)
    kw = dict(res_frac=8, o_frac=8, u_frac=8) if formats else {}
    return quantize_model(cfg, make_tensors(cfg, seed), lanes=lanes, **kw)


def run_both(qm, interp, tokens, state=None):
    """Feed ``tokens`` to the interpreter and the golden model; assert equal logits and next
    token after every one. Returns the golden state."""
    gm = IntegerModel(qm)
    state = gm.new_state() if state is None else state
    for k, t in enumerate(tokens):
        logits, nxt = interp.step(t)
        want, state = gm.step(t, state)
        assert logits.dtype == np.int16 and logits.shape == (qm.cfg.vocab_size,)
        assert np.array_equal(logits, want), f"token {k} ({t}): logits differ"
        assert nxt == arith.argmax(want)
    return state


# --------------------------------------------------------------------------- bit-exact runs

def test_shipped_model_runs_bit_exact(shipped, shipped_image):
    interp = Interpreter(bytes(shipped_image.data), ICEBREAKER)
    rng = np.random.default_rng(4)
    print("tokens seed 4")
    text = list(b"Love is a battlefield, said the fortune cookie. ")
    tokens = (text + rng.integers(0, 256, 64).tolist())[:64]
    run_both(shipped, interp, tokens)
    # state carries over; after reset_state the device starts afresh like a new golden state
    interp.reset_state()
    assert not interp.state.any()
    run_both(shipped, interp, tokens[:16])
    # counters: every weight once per token; core busy = ternary weights / lanes here
    assert interp.last_core_busy == shipped.cfg.ternary_weights() // ICEBREAKER.lanes == 19456
    assert interp.last_cycles == sum(c.cycles for c in program_cost(interp.program))
    print(f"shipped model: {interp.last_cycles} cycles/token, core busy {interp.last_core_busy}, "
          f"{interp.last_cycles / interp.last_core_busy:.3f}x the ideal")


# (V, d, L, I, lower bounds, lanes): d, I and V not multiples of the lanes; max_layers; d = max_d
RANDOM_SHAPES = [(40, 40, 1, 64, True, 32), (100, 72, 3, 48, True, 16),
                 (64, 24, 2, 24, False, 8), (200, 128, 4, 32, True, 32)]


@pytest.mark.parametrize("V,d,L,I,lb,lanes", RANDOM_SHAPES)
def test_random_models_run_bit_exact(make_tensors, V, d, L, I, lb, lanes):
    qm = small_model(make_tensors, V, d, L, I, lb, lanes)
    hw = HardwareConfig(lanes=lanes)
    image = build_image(qm, hw)
    interp = Interpreter(image.data, hw)
    rng = np.random.default_rng(V + d)
    print(f"tokens seed {V + d}")
    tokens = [0, V - 1] + rng.integers(0, V, 14).tolist()
    state = run_both(qm, interp, tokens)
    assert any(s.any() for s in state)
    interp.reset_state()
    run_both(qm, interp, tokens[::-1][:6])
    groups = sum(-(-p.trits.shape[0] // lanes) * p.trits.shape[1] for _, p in qm.bitlinears())
    assert interp.last_core_busy == groups


def test_interpreter_reads_the_image(shipped_image):
    """The interpreter takes the weights from the image bytes: with the head's trits zeroed,
    every logit is 0."""
    data = bytearray(shipped_image.data)
    region = shipped_image.memory["lm_head.trits"]
    data[region.byte:region.byte + region.nbytes] = bytes(region.nbytes)
    a, _ = Interpreter(shipped_image.data).step(65)
    b, nxt = Interpreter(bytes(data)).step(65)
    assert a.any() and not b.any() and nxt == 0


def test_interpreter_rejects_bad_tokens_and_images(shipped_image):
    interp = Interpreter(shipped_image.data)
    for bad in (-1, 256, 3.0, True):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
            interp.step(bad)
    other = HardwareConfig(scratch_words=1024)
    with pytest.raises(ImageError, match="built for hardware configuration"):
        Interpreter(shipped_image.data, other)
    with pytest.raises(ImageError, match="not a device image"):
        Interpreter(b"MMFB" + shipped_image.data[4:])
    n = len(shipped_image.data)
    with pytest.raises(ImageError, match=f"announces {n:,} bytes; the image has {n - 8:,}"):
        Interpreter(shipped_image.data[:-8])
    # a program whose vector runs past the image is caught when it is loaded
    h = shipped_image.header
    bad = replace(shipped_image.program[1], w_addr=len(shipped_image.data) // 8 - 1)
    data = bytearray(shipped_image.data)
    data[(h.program_addr + 2) * 8:(h.program_addr + 4) * 8] = bad.to_bytes()
    with pytest.raises(ImageError, match=r"the image's program instruction 1 \(NORM\) reads w bytes .* past "
                                         r"the image's"):
        Interpreter(bytes(data))
    # an embedding row outside the image is found when a token reads it
    data = bytearray(shipped_image.data)
    emb = replace(shipped_image.program[0], table_addr=len(shipped_image.data) // 8 - 16)   # row 0 is the last 16 words
    data[h.program_addr * 8:(h.program_addr + 2) * 8] = emb.to_bytes()
    interp = Interpreter(bytes(data))
    interp.step(0)
    with pytest.raises(ExecutionError, match=r"instruction 0 \(EMBED\) reads embedding bytes"):
        interp.step(1)


# --------------------------------------------------------------------------- encoding

def random_instruction(cls, hw, rng):
    specs = isa.instruction_layout(hw)[cls.op]
    while True:
        values = {s.name: int(rng.integers(s.lo, s.hi + 1)) for s in specs}
        insn = cls(**values)
        try:
            insn.validate(hw)
            return insn
        except ValueError:          # a vector ran past its memory: draw again
            continue


@pytest.mark.parametrize("hw", [ICEBREAKER, HardwareConfig(lanes=8, max_d=64, max_inter=96, max_vocab=1000,
                                                           max_layers=3, weight_words=3000, scratch_words=700)])
def test_encode_decode_round_trip(hw):
    rng = np.random.default_rng(11)
    print("seed 11")
    layout = isa.instruction_layout(hw)
    for op, cls in isa.INSTRUCTION_CLASSES.items():
        specs = layout[op]
        assert [s.name for s in specs] == list(cls.operand_names())
        assert all(s.lsb + s.width <= isa.INSN_BITS for s in specs)
        # every field at both ends of its range, and random instructions
        cases = [random_instruction(cls, hw, rng) for _ in range(200)]
        for s in specs:
            for v in (s.lo, s.hi):
                base = random_instruction(cls, hw, rng)
                insn = replace(base, **{s.name: v})
                try:
                    insn.validate(hw)
                except ValueError:
                    continue
                cases.append(insn)
        for insn in cases:
            words = insn.encode(hw)
            assert len(words) == isa.INSN_WORDS and all(0 <= w < 1 << 64 for w in words)
            assert words[0] & 0xF == int(op)
            assert Instruction.decode(words, hw) == insn
            assert Instruction.decode(insn.to_bytes(hw), hw) == insn
            assert Instruction.decode(words[0] | words[1] << 64, hw) == insn
    program = [random_instruction(cls, hw, rng) for cls in isa.INSTRUCTION_CLASSES.values()]
    assert isa.decode_program(isa.encode_program(program, hw), hw) == program


def test_fields_are_packed_in_order():
    """Operands follow the opcode in declaration order without gaps; dst and the first source
    sit at the same bits in every instruction that has them."""
    layout = isa.instruction_layout(ICEBREAKER)
    for op, specs in layout.items():
        lsb = isa.OP_BITS
        for s in specs:
            assert s.lsb == lsb
            lsb += s.width
    sw = (ICEBREAKER.scratch_words - 1).bit_length()
    for op in (Op.EMBED, Op.NORM, Op.BITLINEAR, Op.MLGRU, Op.GLU, Op.RESADD):
        assert (layout[op][0].name, layout[op][0].lsb, layout[op][0].width) == ("dst", 4, sw)
    assert (layout[Op.BITLINEAR][2].name, layout[Op.BITLINEAR][2].width) == ("rows", 10)    # 512 rows
    assert layout[Op.NORM][4].signed and layout[Op.BITLINEAR][8].signed


def test_encode_rejects_out_of_range_operands():
    ok = Norm(dst=0, src=128, n=128, w_addr=100, frac_diff=-3, eps_q=5, comment="attn")
    ok.encode()
    cases = [
        (replace(ok, n=129),
         r"NORM \(attn\) field n = 129 is outside \[1, 128\] \(max_d of this hardware configuration\)"),
        (replace(ok, n=0), r"field n = 0 is outside \[1, 128\]"),
        (replace(ok, frac_diff=16), r"field frac_diff = 16 is outside \[-15, 15\]"),
        (replace(ok, eps_q=1 << 32), r"field eps_q = 4,294,967,296 is outside \[1, 4,294,967,295\]"),
        (replace(ok, w_addr=16384),
         r"field w_addr = 16,384 is outside \[0, 16,383\] \(the weight memory has 16,384 words\)"),
        (replace(ok, dst=2048), r"field dst = 2,048 is outside \[0, 2,047\] \(the scratch memory has 2,048 words\)"),
        (replace(ok, src=2000), r"src vector \[2000, 2128\) runs past the scratch memory's 2,048 words"),
        (replace(ok, w_addr=16380), r"w_addr \[16380, 16412\) runs past the weight memory's 16,384 words"),
        (replace(ok, dst=130), r"dst \[130, 258\) partly overlaps src \[128, 256\)"),
        (replace(ok, n=True), r"field n must be an integer"),
        (BitLinear(dst=0, src=0, rows=513, cols=8, g_addr=0, trit_addr=8, eps_q=1, gamma_mant=1 << 15,
                   scale_exp=0), r"field rows = 513 is outside \[1, 512\] \(max_rows"),
        (BitLinear(dst=0, src=0, rows=8, cols=8, g_addr=0, trit_addr=8, eps_q=70000, gamma_mant=1 << 15,
                   scale_exp=0), r"field eps_q = 70,000 is outside \[1, 65,535\] \(a 16-bit field\)"),
        (BitLinear(dst=0, src=0, rows=8, cols=8, g_addr=0, trit_addr=8, eps_q=1, gamma_mant=1 << 15,
                   scale_exp=-129), r"field scale_exp = -129 is outside \[-128, 127\]"),
        (BitLinear(dst=0, src=0, rows=512, cols=256, g_addr=0, trit_addr=16000, eps_q=1, gamma_mant=1 << 15,
                   scale_exp=0), r"trit_addr \[16000, 20096\) runs past the weight memory"),
        (MLGRU(dst=0, i_src=0, f_src=0, gn_src=0, n=8, layer=4, has_lb=0, lb_addr=0, g_frac=0, o_frac=0),
         r"field layer = 4 is outside \[0, 3\] \(max_layers"),
        (GLU(dst=0, gate_src=8, up_src=16, n=257, u_frac=0), r"field n = 257 is outside \[1, 256\] \(max_inter"),
        (ArgMax(src=0, n=257), r"field n = 257 is outside \[1, 256\] \(max_vocab"),
        (ResAdd(dst=0, src=1, n=8, shift=0), r"dst \[0, 8\) partly overlaps src \[1, 9\)"),
        (Embed(dst=0, n=8, table_addr=0, scale_addr=0, emb_shift=25), r"field emb_shift = 25 is outside \[0, 24\]"),
    ]
    for insn, message in cases:
        with pytest.raises(ValueError, match=message):
            insn.encode(ICEBREAKER)
    # sources may coincide with the destination; BITLINEAR may overlap freely
    ResAdd(dst=0, src=0, n=8, shift=1).encode()
    BitLinear(dst=4, src=0, rows=8, cols=8, g_addr=0, trit_addr=8, eps_q=1, gamma_mant=1 << 15,
              scale_exp=0).encode()


def test_decode_rejects_bad_words():
    with pytest.raises(ValueError, match="opcode 15 is not an instruction"):
        Instruction.decode((15, 0))
    good = ArgMax(src=3, n=10).encode()
    with pytest.raises(ValueError, match="ARGMAX instruction has non-zero bits above bit 23"):
        Instruction.decode((good[0] | 1 << 24, 0))
    with pytest.raises(ValueError, match=r"field n = 0 is outside \[1, 256\]"):
        Instruction.decode((int(Op.ARGMAX), 0))
    with pytest.raises(ValueError, match="an instruction is 16 bytes, not 8"):
        Instruction.decode(b"\0" * 8)
    with pytest.raises(ValueError, match="64-bit unsigned integers"):
        Instruction.decode((1 << 64, 0))
    assert Instruction.decode((0, 0)) == Halt()         # zeroed memory halts
    assert Instruction.decode(ArgMax(src=np.int64(3), n=np.int16(10)).encode()) == ArgMax(src=3, n=10)


def test_hardware_config():
    assert ICEBREAKER == HardwareConfig()
    assert (ICEBREAKER.lanes, ICEBREAKER.weight_words * 8, ICEBREAKER.max_rows, ICEBREAKER.max_cols) == \
        (16, 131072, 512, 256)
    from mmfree.models.quantized import DEFAULT_LANES
    assert DEFAULT_LANES == ICEBREAKER.lanes
    text = ("mmfree-hw isa=1 lanes=16 max_d=128 max_inter=256 max_vocab=256 max_layers=4 "
            "weight_words=16384 program_words=256 scratch_words=2048 clock_hz=24000000 baud=3000000")
    assert ICEBREAKER.config_hash == zlib.crc32(text.encode())
    hashes = {HardwareConfig(**{f.name: getattr(ICEBREAKER, f.name) * 2 if f.name != "lanes" else 32})
              .config_hash for f in fields(HardwareConfig)}
    assert len(hashes) == len(fields(HardwareConfig)) and ICEBREAKER.config_hash not in hashes
    info = ICEBREAKER.info()
    assert (info.config_hash, info.memory_bytes, info.lanes, info.max_vocab) == \
        (ICEBREAKER.config_hash, 131072, 16, 256)
    for kw, message in [({"lanes": 64}, "lanes must be 8, 16 or 32"),
                        ({"max_d": 0}, "max_d must be a positive integer"),
                        ({"max_vocab": 70000}, "max_vocab must be at most 65535"),
                        ({"program_words": 1}, "must hold at least one instruction"),
                        ({"clock_hz": 10_000_000}, "fewer than 4 clock cycles per UART bit"),
                        ({"scratch_words": 1 << 20}, "needs 131 bits for BITLINEAR instructions; they have 128")]:
        with pytest.raises(ValueError, match=message):
            HardwareConfig(**kw)


# --------------------------------------------------------------------------- does it fit?

def test_check_fits_messages(make_tensors, shipped):
    assert fits(shipped) is None
    check_fits(shipped, ICEBREAKER)

    def refuses(qm, hw, message):
        with pytest.raises(ModelDoesNotFit) as info:
            check_fits(qm, hw)
        assert str(info.value) == message
        assert fits(qm, hw) == message
        with pytest.raises(ModelDoesNotFit):
            build_image(qm, hw)

    refuses(shipped, HardwareConfig(lanes=32), "the model's trits are packed for 16 lanes and this "
            "bitstream's ternary core has 32; convert the model again with lanes=32")
    refuses(shipped, HardwareConfig(max_d=96), "the model's hidden size d = 128 exceeds this "
            "bitstream's max_d = 96 by 32")
    refuses(shipped, HardwareConfig(max_inter=128), "the model's intermediate size I = 192 exceeds "
            "this bitstream's max_inter = 128 by 64")
    refuses(shipped, HardwareConfig(max_vocab=200), "the model's vocabulary V = 256 exceeds this "
            "bitstream's max_vocab = 200 by 56")
    refuses(shipped, HardwareConfig(max_layers=1), "the model's layers = 2 exceeds this "
            "bitstream's max_layers = 1 by 1")
    # scratch: 3d + max(5d, 3I, V) words
    # the top 3 x 256 words of scratch are the core's temporary vectors
    refuses(shipped, HardwareConfig(scratch_words=1780), "the model needs 1,024 words of scratch "
            "memory; this bitstream leaves programs 1,012 of its 1,780 (12 words too many)")
    refuses(shipped, HardwareConfig(program_words=60), "the model's program needs 62 words; this "
            "bitstream's sequencer addresses 60 (2 words too many)")
    # weight memory: every part counted here independently of memory_map
    big = small_model(make_tensors, 256, 128, 4, 256, formats=True)
    cfg = big.cfg
    d, I, V = cfg.d, cfg.intermediate_size, cfg.vocab_size
    pad = lambda n: -(-n // 8) * 8                                      # noqa: E731
    trits = sum(pad(-(-p.trits.shape[0] // 32) * p.trits.shape[1] * 8) for _, p in big.bitlinears())
    vectors = 4 * (9 * pad(2 * d) + pad(2 * I)) - pad(2 * d) + 2 * pad(2 * d)   # layer 0: no lower bound
    need = 32 + 16 * program_length(4) + trits + V * pad(d) + pad(2 * V) + vectors
    assert need == memory_map(big, ICEBREAKER).words * 8
    refuses(big, ICEBREAKER, f"the model needs {need:,} bytes of weight memory; this bitstream "
            f"has 131,072 ({need - 131072:,} bytes too many)")
    # an operand beyond its field
    odd = small_model(make_tensors, 40, 24, 1, 24, formats=True)
    odd.lm_head.eps_q = 70000
    refuses(odd, ICEBREAKER, "BITLINEAR (lm_head: x -> logits (LOGIT_FRAC = 8)) field eps_q = "
            "70,000 is outside [1, 65,535] (a 16-bit field)")
    # the first limit exceeded is named
    many = small_model(make_tensors, 300, 136, 5, 24, formats=True)
    refuses(many, ICEBREAKER, "the model's layers = 5 exceeds this bitstream's max_layers = 4 by 1")


# --------------------------------------------------------------------------- the image

def test_image_layout(shipped, shipped_image):
    image, qm, cfg = shipped_image, shipped, shipped.cfg
    data = image.data
    assert build_image(read_board_model(SHIPPED), ICEBREAKER).data == data      # deterministic
    assert len(data) % 8 == 0 and len(data) <= ICEBREAKER.weight_bytes
    h = isa.ImageHeader.unpack(data)
    assert h == image.header == check_image(data, ICEBREAKER)
    assert data[:4] == b"MMFI"
    assert (h.isa_version, h.arith_version, h.lanes, h.n_layers, h.vocab, h.d, h.inter) == \
        (isa.ISA_VERSION, arith.ARITH_VERSION, 16, 2, 256, 128, 192)
    assert (h.image_length, h.config_hash, h.program_addr) == (len(data), ICEBREAKER.config_hash, 4)
    # header fields at the documented offsets
    for name, (offset, size) in isa.HEADER_FIELDS.items():
        value = int.from_bytes(data[offset:offset + size], "little")
        if name == "magic":
            assert data[offset:offset + size] == isa.IMAGE_MAGIC
        elif name == "reserved":
            assert value == 0
        else:
            assert value == getattr(h, name), name
    # regions tile the image without gaps, in the documented order
    regions = image.memory.regions
    assert regions[0].word == 0 and all(a.word + a.words == b.word for a, b in zip(regions, regions[1:]))
    assert image.memory.words * 8 == len(data)
    kinds = [r.kind for r in regions]
    n_bl = len(list(qm.bitlinears()))
    assert kinds[:2 + n_bl + 2] == ["header", "program"] + ["trits"] * n_bl + ["int8", "uint16"]
    assert set(kinds[2 + n_bl + 2:]) == {"int16", "uint16"}
    # program
    prog = image.memory["program"]
    assert isa.decode_program(data[prog.byte:prog.byte + prog.nbytes]) == list(image.program)
    assert len(image.program) == h.program_length == program_length(2)
    # trits are exactly pack_trits' bytes, followed by zero padding
    mm = image.memory
    for name, p in qm.bitlinears():
        r = mm[f"{name}.trits"]
        assert data[r.byte:r.byte + r.nbytes] == pack_trits(p.trits, ICEBREAKER.lanes).tobytes()
        assert not any(data[r.byte + r.nbytes:(r.word + r.words) * 8])
        assert r.words == -(-p.trits.shape[0] // 32) * p.trits.shape[1]     # one word per column
    # embeddings, scales and vectors
    r = mm["embed.q"]
    table = np.frombuffer(data[r.byte:r.byte + r.nbytes], np.int8).reshape(cfg.vocab_size, -1)
    assert np.array_equal(table[:, :cfg.d], qm.emb_q)
    r = mm["embed.scale"]
    assert np.array_equal(np.frombuffer(data[r.byte:r.byte + r.nbytes], "<u2"), qm.emb_scale)
    vectors = {f"{n}.w": p.w_q for n, p in qm.norms()} | {f"{n}.g": p.g_q for n, p in qm.bitlinears()}
    vectors |= {f"layers.{l}.lower_bound": layer.lower_bound for l, layer in enumerate(qm.layers)
                if layer.lower_bound is not None}
    assert set(vectors) == {r.name for r in regions if r.kind in ("int16", "uint16") and r.name != "embed.scale"}
    for name, values in vectors.items():
        r = mm[name]
        dtype = "<u2" if name.endswith("lower_bound") else "<i2"
        assert np.array_equal(np.frombuffer(data[r.byte:r.byte + r.nbytes], dtype), values), name
    # the program's addresses point at the regions of its constants
    i_proj = image.program[2]
    assert (i_proj.g_addr, i_proj.trit_addr) == (mm["layers.0.i_proj.g"].word, mm["layers.0.i_proj.trits"].word)
    assert h.logits_addr == image.scratch.logits == image.program[-2].src


def test_program_reaches_every_constant(shipped, shipped_image):
    """Every constant of the QuantizedModel is an operand (or a vector the program addresses)."""
    qm, prog, mm = shipped, shipped_image.program, shipped_image.memory
    norms = [i for i in prog if isinstance(i, Norm)]
    bls = [i for i in prog if isinstance(i, BitLinear)]
    named_norms = list(qm.norms())
    order = [n for l in range(2) for n in (f"layers.{l}.attn_norm", f"layers.{l}.g_norm",
                                           f"layers.{l}.mlp_norm")] + ["final_norm"]
    by_name = dict(named_norms)
    for insn, name in zip(norms, order):
        p = by_name[name]
        assert (insn.w_addr, insn.frac_diff, insn.eps_q) == (mm[f"{name}.w"].word, p.w_frac - p.out_frac, p.eps_q)
    for insn, (name, p) in zip(bls, qm.bitlinears()):
        assert (insn.rows, insn.cols) == p.trits.shape
        assert (insn.eps_q, insn.gamma_mant, insn.scale_exp) == (p.eps_q, p.gamma_mant, p.scale_exp)
        assert (insn.g_addr, insn.trit_addr) == (mm[f"{name}.g"].word, mm[f"{name}.trits"].word)
    rf = qm.res_fracs
    assert [i.shift for i in prog if isinstance(i, ResAdd)] == [rf[k] - rf[k + 1] for k in range(4)]
    grus = [i for i in prog if isinstance(i, MLGRU)]
    assert [(g.layer, g.o_frac, g.g_frac, g.has_lb) for g in grus] == \
        [(l, layer.o_frac, layer.g_norm.out_frac, int(layer.lower_bound is not None))
         for l, layer in enumerate(qm.layers)]
    assert [g.u_frac for g in prog if isinstance(g, GLU)] == [layer.u_frac for layer in qm.layers]
    emb = prog[0]
    assert isinstance(emb, Embed) and emb.emb_shift == qm.emb_shift
    sm = ScratchMap.for_dims(128, 192, 256)
    assert sm.words == 3 * 128 + max(5 * 128, 3 * 192, 256) == 1024


# --------------------------------------------------------------------------- assembler

def test_assembler_round_trip(shipped_image):
    listing = assembler.disassemble(shipped_image)
    assert listing.startswith("; tiny-fortunes: V=256 d=128 L=2 I=192 lanes=16, 31 instructions at word 4")
    assert "@0004  EMBED" in listing and "; layers.1.mlgru" in listing
    program = assembler.assemble(listing, ICEBREAKER)
    assert program == list(shipped_image.program)
    assert [i.comment for i in program] == [i.comment for i in shipped_image.program]
    # from the raw image bytes (no comments there) and from encoded instructions
    from_bytes = assembler.assemble(assembler.disassemble(shipped_image.data))
    assert from_bytes == program
    encoded = isa.encode_program(program)
    assert assembler.assemble(assembler.disassemble(encoded)) == program
    text = """
        ; a comment line
        @0010 RESADD dst=0x10 src=0x20 n=16 shift=2   ; r += delta
        argmax n=5 src=7
        HALT
    """
    assert assembler.assemble(text) == [ResAdd(dst=16, src=32, n=16, shift=2), ArgMax(src=7, n=5), Halt()]
    assert assembler.assemble(text)[0].comment == "r += delta"
    for bad, message in [("FOO x=1", "line 1: 'FOO' is not an instruction"),
                         ("\nARGMAX src=1", "line 2: ARGMAX needs operand 'n'"),
                         ("ARGMAX src=1 n=2 m=3", "line 1: ARGMAX has no operand 'm'"),
                         ("ARGMAX src=1 n=two", "line 1: operand n='two' is not an integer"),
                         ("ARGMAX src=1 n", "line 1: operand 'n' is not of the form name=value"),
                         ("ARGMAX src=1 n=1 n=2", "line 1: operand 'n' is given twice"),
                         ("ARGMAX src=1 n=300", r"line 1: ARGMAX field n = 300 is outside \[1, 256\]")]:
        with pytest.raises(ValueError, match=message):
            assembler.assemble(bad, ICEBREAKER)


# --------------------------------------------------------------------------- cost model and docs

def test_cost_model_matches_the_units():
    """The latencies the cost model assumes are the ones the gateware units document."""
    from mmfree.hdl.rmsnorm import stats_latency
    from mmfree.hdl.scalars import BitLinearScalars
    from mmfree.hdl.sequencer import OPERAND_STAGES
    from mmfree.hdl.valu import VALU

    for hw in (ICEBREAKER, HardwareConfig(max_d=512, max_inter=1024, max_vocab=512, scratch_words=8192)):
        cm = CostModel.for_hw(hw)
        assert cm.lanes == hw.lanes
        assert cm.stats == stats_latency(hw.max_cols)
        assert (cm.valu, cm.scalars) == (VALU(1).latency, BitLinearScalars.max_cycles)
        assert cm.operand == OPERAND_STAGES


def test_cost_formulas():
    cm = CostModel.for_hw(HardwareConfig(lanes=32))
    assert (cm.stats, cm.valu, cm.scalars) == (123, 6, 112)
    pass_ = lambda n: 1 + n + 1 + 6 + 2               # start, elements, operand register, VALU, end
    bl = BitLinear(dst=0, src=0, rows=128, cols=128, g_addr=0, trit_addr=0, eps_q=1, gamma_mant=1 << 15,
                   scale_exp=0)
    # the act pass starts when the scalars are ready: 1 (start) + 128 elements + the
    # statistics (123) + 2 cycles to the request + the scalars (112), later than the
    # stats_absmax and normalize passes (2 x 137 + 1); then the act pass, and the core
    # phase: 4 groups of 128 columns, group 0 started under the act pass, the last group's
    # 32 sums drain
    head = 1 + max(2 * 137 + 1, 128 + 123 + 112 + 2)
    core = 1 + 3 * 128 + 32 + 1 + 6 + 2
    assert cm.cost(bl) == (4 + head + pass_(128) + core, 512)
    # fewer columns than lanes: groups start lanes + 1 cycles apart
    short = replace(bl, rows=40, cols=16)
    assert cm.cost(short) == (4 + 1 + (16 + 123 + 112 + 2) + pass_(16)
                              + 1 + 1 * 33 + 8 + 1 + 6 + 2, 2 * 16)
    # a long input: the two passes are the longer path
    long = replace(bl, rows=32, cols=256)
    assert cm.cost(long) == (4 + 1 + (2 * pass_(256) - 1) + pass_(256) + 1 + 32 + 1 + 6 + 2, 256)
    assert cm.cost(Norm(dst=0, src=0, n=128, w_addr=0, frac_diff=0, eps_q=1)) == (
        4 + (1 + 128 + 123 + 2) + pass_(128), 0)
    mlgru = MLGRU(dst=0, i_src=0, f_src=0, gn_src=0, n=128, layer=0, has_lb=0, lb_addr=0,
                  g_frac=0, o_frac=0)
    # 8 sub-passes, the lower bound's skipped (1 cycle)
    assert cm.cost(mlgru) == (4 + 7 * pass_(128) + 1, 0)
    assert cm.cost(replace(mlgru, has_lb=1)) == (4 + 8 * pass_(128), 0)


def test_docs_state_the_current_layout_and_cycles(shipped_image):
    doc = (ROOT / "docs/isa.md").read_text()
    assert isa.format_layout(ICEBREAKER) in doc
    costs = program_cost(shipped_image.program)
    cycles, busy = sum(c.cycles for c in costs), sum(c.core_busy for c in costs)
    assert f"{cycles:,} cycles per token" in doc and f"{busy:,}" in doc
    assert f"{cycles / busy:.2f}x" in doc
