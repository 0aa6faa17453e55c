"""cocotb testbench of hdl/accelerator.py (run from tests/test_accelerator.py through
``run_cocotb``): a device image goes in through ``load``, tokens through ``start``/``done``,
the logits come back through ``logit_addr``/``logit_data``, and everything is compared with
what the pytest side computed with the firmware interpreter and the integer golden model.

Parameters (``tb_params()``):
    ``memory_bytes``   the core's weight memory in bytes (``load.addr``'s range)
    ``image``          the device image, hex
    ``vocab``          V (the header's vocabulary size)
    ``max_state``      ``max_layers · max_d`` (cycles the state clear takes at least)
    ``events``         a list of ``{"token": t, "next": n, "cycles": c, "busy": b,
                       "logits": [...]}`` (expected results) or ``"reset"``
    ``seed``           for the random idle cycles and back-pressure
"""

import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge

from mmfree.hdl.accelerator import DoneBeat, LoadBeat, StartBeat
from mmfree.sim.cocotb_runner import tb_params
from mmfree.sim.cocotb_streams import StreamSink, StreamSource

__all__ = ["RESET"]

RESET = "reset"


async def _wait_high(dut, signal, limit: int, what: str) -> int:
    for n in range(limit):
        if int(signal.value):
            return n
        await RisingEdge(dut.clk)
    raise TimeoutError(f"{what} did not rise within {limit} cycles")


async def _read_logits(dut, count: int, rng: random.Random) -> dict:
    """Logit k for every k < count, in random order, through the registered read port: the
    address is set after a falling edge and the data read after the next one."""
    order = list(range(count))
    rng.shuffle(order)
    got = {}
    for k in order:
        await FallingEdge(dut.clk)
        dut.logit_addr.value = k
        await FallingEdge(dut.clk)
        got[k] = dut.logit_data.value.to_signed()
    return got


@cocotb.test()
async def test_image_tokens_logits(dut):
    p = tb_params()
    rng = random.Random(p["seed"])
    image = bytes.fromhex(p["image"])
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    for name in ("load__valid", "start__valid", "done__ready", "reset_state", "model_ok", "logit_addr"):
        getattr(dut, name).value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0
    await RisingEdge(dut.clk)
    assert int(dut.header_ok.value) == 0, "header_ok must be low before an image is loaded"
    assert int(dut.start__ready.value) == 0, "start must not be taken without model_ok"

    load = StreamSource(dut, "load", LoadBeat(p["memory_bytes"]), dut.clk, idle=0.2, rng=rng)
    await load.send([{"addr": a, "data": b} for a, b in enumerate(image)])
    await RisingEdge(dut.clk)
    assert int(dut.header_ok.value) == 1, "the image's header was not accepted"
    assert int(dut.vocab_size.value) == p["vocab"]
    dut.model_ok.value = 1
    await _wait_high(dut, dut.ready_state, 4 * p["max_state"] + 100, "ready_state after reset")

    start = StreamSource(dut, "start", StartBeat(), dut.clk, idle=0.5, rng=rng)
    done = StreamSink(dut, "done", DoneBeat(), dut.clk, stall=0.5, rng=rng)
    done.start()
    taken = 0
    for k, ev in enumerate(p["events"]):
        if ev == RESET:
            await FallingEdge(dut.clk)
            dut.reset_state.value = 1
            await FallingEdge(dut.clk)
            dut.reset_state.value = 0
            assert int(dut.ready_state.value) == 0, "ready_state must drop after a reset strobe"
            n = await _wait_high(dut, dut.ready_state, 4 * p["max_state"] + 100, "ready_state")
            assert n >= p["max_state"], f"the state clear took only {n} cycles"
            continue
        await start.send([{"token": ev["token"]}])
        await FallingEdge(dut.clk)
        assert int(dut.load__ready.value) == 0, "load must wait while a token runs"
        (result,) = (await done.wait_for(taken + 1))[taken:]
        taken += 1
        assert result == {"next_token": ev["next"], "cycles": ev["cycles"], "busy": ev["busy"]}, \
            f"event {k} (token {ev['token']}): got {result}"
        got = await _read_logits(dut, p["vocab"], rng)
        want = ev["logits"]
        bad = [j for j in range(p["vocab"]) if got[j] != want[j]]
        assert not bad, f"event {k}: logits differ at {bad[:8]}: got {[got[j] for j in bad[:8]]}, " \
                        f"want {[want[j] for j in bad[:8]]}"
    await ClockCycles(dut.clk, 20)
    assert len(done.items) == taken, "done produced results nobody asked for"
