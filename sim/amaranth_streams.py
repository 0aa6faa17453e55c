"""Stream helpers for Amaranth simulator testbenches (``async def tb(ctx)``).

``stream_put``/``stream_get`` move one payload; the ``*_all`` variants insert seeded random
idle cycles (source side) or back-pressure (sink side)."""

from __future__ import annotations

import random

__all__ = ["stream_put", "stream_get", "stream_put_all", "stream_get_all"]


async def stream_put(ctx, stream, payload) -> None:
    ctx.set(stream.payload, payload)
    ctx.set(stream.valid, 1)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


async def stream_get(ctx, stream):
    ctx.set(stream.ready, 1)
    payload, = await ctx.tick().sample(stream.payload).until(stream.valid)
    ctx.set(stream.ready, 0)
    return payload


async def stream_put_all(ctx, stream, payloads, *, idle: float = 0.0, rng: random.Random | None = None) -> None:
    rng = rng or random.Random(0)
    for payload in payloads:
        while idle and rng.random() < idle:
            await ctx.tick()
        await stream_put(ctx, stream, payload)


async def stream_get_all(ctx, stream, count: int, *, stall: float = 0.0,
                         rng: random.Random | None = None) -> list:
    rng = rng or random.Random(1)
    out = []
    while len(out) < count:
        while stall and rng.random() < stall:
            await ctx.tick()
        out.append(await stream_get(ctx, stream))
    return out
