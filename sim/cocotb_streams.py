"""cocotb drivers for Amaranth ``stream.Signature`` ports (``<name>__payload/valid/ready``).

Payloads are packed and unpacked with the Amaranth layout of the port, so testbenches speak in
dicts and lists: ``{"x": -3, "last": 1}`` for a StructLayout, ``[...]`` for an ArrayLayout.
:class:`StreamSource` inserts random idle cycles, :class:`StreamSink` random back-pressure,
both from a seeded ``random.Random``.
"""

from __future__ import annotations

import random

import cocotb
from amaranth.hdl import Shape
from amaranth.lib import data
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge


async def start_and_reset(dut, period_ns: float = 10, cycles: int = 2) -> None:
    """Start ``dut.clk`` and hold ``dut.rst`` for ``cycles`` rising edges."""
    cocotb.start_soon(Clock(dut.clk, period_ns, unit="ns").start())
    dut.rst.value = 1
    for _ in range(cycles):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

__all__ = ["pack", "unpack", "StreamSource", "StreamSink", "start_and_reset"]


def pack(shape, value) -> int:
    """Python value → the bits of ``shape`` (a Shape or an Amaranth data layout)."""
    if isinstance(shape, data.ArrayLayout):
        w = Shape.cast(shape.elem_shape).width
        bits = 0
        for i, v in enumerate(value):
            bits |= pack(shape.elem_shape, v) << (i * w)
        return bits
    if isinstance(shape, data.Layout):
        bits = 0
        for name, field in shape:
            bits |= pack(field.shape, value.get(name, 0)) << field.offset
        return bits
    s = Shape.cast(shape)
    v = int(value)
    lo, hi = (-(1 << (s.width - 1)), (1 << (s.width - 1)) - 1) if s.signed else (0, (1 << s.width) - 1)
    if not lo <= v <= hi:
        raise ValueError(f"{v} does not fit {s}")
    return v & ((1 << s.width) - 1)


def unpack(shape, bits: int):
    """Bits of ``shape`` → Python value (dict for StructLayout, list for ArrayLayout, int else)."""
    if isinstance(shape, data.ArrayLayout):
        w = Shape.cast(shape.elem_shape).width
        return [unpack(shape.elem_shape, (bits >> (i * w)) & ((1 << w) - 1)) for i in range(shape.length)]
    if isinstance(shape, data.Layout):
        out = {}
        for name, field in shape:
            w = Shape.cast(field.shape).width
            out[name] = unpack(field.shape, (bits >> field.offset) & ((1 << w) - 1))
        return out
    s = Shape.cast(shape)
    bits &= (1 << s.width) - 1
    if s.signed and bits >> (s.width - 1):
        bits -= 1 << s.width
    return bits


class StreamSource:
    """Drives ``<prefix>__payload`` and ``__valid``; waits for ``__ready``."""

    def __init__(self, dut, prefix: str, shape, clk, *, idle: float = 0.0, rng: random.Random | None = None):
        self.payload = getattr(dut, f"{prefix}__payload")
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.shape, self.clk, self.idle = shape, clk, idle
        self.rng = rng or random.Random(0)
        self.valid.value = 0
        self.sent = 0

    async def send(self, values, on_accept=None) -> None:
        """Send every value; returns once the last one was accepted. Handshakes are sampled at
        the rising edge, so a transfer is a cycle with valid and ready both high.
        ``on_accept(value)``, if given, runs at the edge of each transfer (to sample other
        ports of the design at that moment)."""
        for value in values:
            while self.idle and self.rng.random() < self.idle:
                self.valid.value = 0
                await RisingEdge(self.clk)
            self.payload.value = pack(self.shape, value)
            self.valid.value = 1
            while True:
                await RisingEdge(self.clk)
                if int(self.ready.value):
                    break
            if on_accept is not None:
                on_accept(value)
            self.sent += 1
        self.valid.value = 0


class StreamSink:
    """Drives ``<prefix>__ready`` (randomly low with probability ``stall``) and collects payloads."""

    def __init__(self, dut, prefix: str, shape, clk, *, stall: float = 0.0, rng: random.Random | None = None,
                 record=None):
        """``record(payload)``, if given, makes the item stored for each transfer (it runs at the
        transfer's edge, so it may also sample other ports of the design)."""
        self.record = record
        self.payload = getattr(dut, f"{prefix}__payload")
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.shape, self.clk, self.stall = shape, clk, stall
        self.rng = rng or random.Random(1)
        self.items: list = []
        self.ready.value = 0
        self._task = None

    def start(self) -> None:
        self._task = cocotb.start_soon(self._run())

    async def _run(self) -> None:
        while True:
            ready = not (self.stall and self.rng.random() < self.stall)
            self.ready.value = int(ready)
            await RisingEdge(self.clk)
            if ready and int(self.valid.value):
                item = unpack(self.shape, int(self.payload.value))
                self.items.append(item if self.record is None else self.record(item))

    async def wait_for(self, count: int, timeout_cycles: int = 1_000_000) -> list:
        for _ in range(timeout_cycles):
            if len(self.items) >= count:
                return self.items[:count]
            await RisingEdge(self.clk)
        raise TimeoutError(f"stream produced {len(self.items)} of {count} expected items")
