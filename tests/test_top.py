"""The whole accelerator (hdl/top.py: UART + link layer + the real AcceleratorCore) with a small
random model, in cocotb + Icarus, at its UART pins: sim/tb_top.py. Every reply byte is compared
with mmfree.sim.refboard.ReferenceBoard (the firmware interpreter behind the link, counters from
its exact cost model), and next tokens and logits with the integer golden model."""

import dataclasses
import random
import time

import pytest

from mmfree.firmware.image import build_image
from mmfree.firmware.isa import WORD_BYTES, HardwareConfig
from mmfree.hdl.top import AcceleratorTop
from mmfree.hdl.uart import MIN_DIVISOR, uart_divisor
from mmfree.models import arith
from mmfree.models.config import ModelConfig
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import quantize_model
from mmfree.sim.cocotb_runner import ICARUS_MISSING, icarus_available, run_cocotb

RESET = "reset"


def top_hw(V, d, L, I, lanes, image_bytes=None):
    """A build just large enough for the model, with the fastest UART the design allows
    (MIN_DIVISOR = 4 clock cycles per bit): quick to simulate."""
    words = 1 << 9
    while image_bytes is not None and words * WORD_BYTES < image_bytes:
        words *= 2
    return HardwareConfig(lanes=lanes, max_d=d, max_inter=I, max_vocab=V, max_layers=L,
                          weight_words=words, scratch_words=512, program_words=2 * (13 * L + 5),
                          clock_hz=MIN_DIVISOR * 3_000_000, baud=3_000_000)


def golden_events(qm, script, logits_at):
    """The integer golden model over ``script`` (tokens and RESET; a token ``None`` is the
    previous next token): per token its next token and, if its index is in ``logits_at``,
    its logits."""
    gm = IntegerModel(qm)
    state = gm.new_state()
    events, nxt = [], None
    for ev in script:
        if ev == RESET:
            state = gm.new_state()
            events.append(RESET)
            continue
        token = nxt if ev is None else ev
        logits, state = gm.step(token, state)
        nxt = arith.argmax(logits)
        k = sum(e != RESET for e in events)
        events.append({"token": int(token), "next": int(nxt),
                       "logits": [int(v) for v in logits] if k in logits_at else None})
    return events


@pytest.mark.skipif(not icarus_available(), reason=ICARUS_MISSING)
def test_top_cocotb(make_tensors, tmp_path):
    """AcceleratorTop with the real core at the UART pins (sim/tb_top.py): garbage + INFO,
    TOKEN without a model, the image in random chunks with one corrupted chunk (refused, then
    resent), a wrong then a right LOAD_DONE, RESET_STATE, a chain of tokens with LOGITS, a
    RESET_STATE and the chain again (same logits), BAD_TOKEN, a truncated frame."""
    V, d, L, I, lanes = 24, 16, 1, 16, 8
    seed = 7321
    print(f"model V{V} d{d} L{L} I{I} lanes={lanes}: seed {seed}")
    rng = random.Random(seed)
    cfg = ModelConfig(V, d, L, I, use_lower_bound=True)
    qm = quantize_model(cfg, make_tensors(cfg, seed), lanes=lanes)
    hw = top_hw(V, d, L, I, lanes)
    image = build_image(qm, hw)
    hw = top_hw(V, d, L, I, lanes, len(image.data))
    image = build_image(qm, hw)
    assert uart_divisor(hw.clock_hz, hw.baud) == MIN_DIVISOR
    t0 = rng.randrange(V)
    script = [RESET, t0, None, None, None, RESET, t0, None]
    events = golden_events(qm, script, logits_at={1, 3, 5})
    # after RESET_STATE the chain repeats itself
    first = [e for e in events if e != RESET]
    assert [e["next"] for e in first[4:]] == [e["next"] for e in first[:2]]
    assert first[5]["logits"] == first[1]["logits"] is not None
    params = {"hw": dataclasses.asdict(hw), "image": image.data.hex(), "vocab": V,
              "events": events, "seed": seed}
    start = time.perf_counter()
    run_cocotb(AcceleratorTop(hw), "accelerator_top", "mmfree.sim.tb_top", tmp_path,
               params=params, seed=seed)
    print(f"accelerator top, {len(image.data)}-byte image: {time.perf_counter() - start:.1f} s "
          f"(Verilog + Icarus)")
