"""Boards that ``mmfree build`` makes bitstreams for: what a board is, and the registry.

A board module (``hdl/boards/<name>.py``) exposes ``BOARD``, a :class:`BoardSpec`: the
amaranth-boards platform, the FPGA's resource budget, the toolchain switches, the size of a
bitstream, and how to wrap the board-independent top (:class:`mmfree.hdl.top.AcceleratorTop`,
UART pins ``uart_rx``/``uart_tx``) into the board's clocking, reset and pins.

    from mmfree.hdl.boards import get_board
    board = get_board("icebreaker")
    hw = board.snap_clock(hw)                 # the clock the board's PLL really makes
    top = board.top(hw)                       # an Elaboratable for board.platform()
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BoardSpec", "BOARDS", "get_board"]


@dataclass(frozen=True)
class BoardSpec:
    """One board.

    name                   the ``--board`` name.
    description            one line for ``--help`` and reports.
    hardware               the default HardwareConfig of a build for this board.
    platform               () → a fresh amaranth-boards platform instance.
    top                    (hw, design=None) → the board wrapper Elaboratable (clock, reset, pins)
                           around ``design`` (default: ``AcceleratorTop(hw, spram=True)``).
    snap_clock             (hw) → ``hw`` with ``clock_hz`` replaced by the frequency the board's
                           clock generator really makes (ValueError if it cannot come close).
    device, package        nextpnr switches (``--up5k``, ``--package sg48``).
    resources              nextpnr cell type → how many the device has, for the fit check
                           (``ICESTORM_LC``, ``ICESTORM_RAM``, ``ICESTORM_SPRAM``, ``ICESTORM_DSP``).
    bin_bytes              size of the bitstream file (``icepack`` output) of this device.
    programmer             the command that writes the .bin to the board (``iceprog``).
    """

    name: str
    description: str
    hardware: object
    platform: Callable
    top: Callable
    snap_clock: Callable
    device: str
    package: str
    resources: dict
    bin_bytes: int
    programmer: str


BOARDS = {
    "icebreaker": "mmfree.hdl.boards.icebreaker",
}
"""Board name → module that defines its ``BOARD``."""


def get_board(name: str) -> BoardSpec:
    """The :class:`BoardSpec` of ``name``; ValueError naming the known boards otherwise."""
    if name not in BOARDS:
        raise ValueError(f"unknown board {name!r}; mmfree builds bitstreams for: "
                         f"{', '.join(sorted(BOARDS))}")
    return importlib.import_module(BOARDS[name]).BOARD
