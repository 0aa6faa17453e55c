"""The board-independent accelerator: UART pins → link layer → accelerator core.

Board wrappers (hdl/boards/) add the clock (PLL), the pin buffers and nothing else; the
simulated board (sim/board.py) compiles this component with Verilator as it is.
"""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from mmfree.firmware.isa import HardwareConfig
from mmfree.hdl.link import LinkLayer, connect_core, core_port_members
from mmfree.hdl.uart import UARTRx, UARTTx

__all__ = ["AcceleratorTop"]


class AcceleratorTop(wiring.Component):
    """UART 8N1 receiver and transmitter + :class:`~mmfree.hdl.link.LinkLayer` +
    :class:`~mmfree.hdl.accelerator.AcceleratorCore` (or another core), in one clock domain
    (``sync``, at ``hw.clock_hz``).

    Parameters
    ----------
    hw : HardwareConfig
        The build: the UART runs at ``hw.baud`` from ``hw.clock_hz``
        (:func:`mmfree.hdl.uart.uart_divisor` must accept them); INFO answers ``hw.info()``.
    spram : bool
        Passed to AcceleratorCore: iCE40 SB_SPRAM256KA weight memory (True) or an inferred
        memory for simulation (False). Ignored when ``core`` is given.
    core : wiring.Component, optional
        A core to use instead of ``AcceleratorCore(hw, spram=spram)``, e.g. the test double
        ``mmfree.hdl.link.StubCore(hw.weight_bytes, hw.max_vocab)``. It must have every port of
        :func:`mmfree.hdl.link.core_port_members` (``header_ok`` is optional) with those
        directions and shapes, for ``hw.weight_bytes`` and ``hw.max_vocab``.

    Ports
    -----
    uart_rx : In(1, init=1)      serial line from the host (idle high; synchronized inside).
    uart_tx : Out(1, init=1)     serial line to the host, straight from a flip-flop.
    rx_errors : Out(16)          UART framing errors, wrapping (debug counter).
    rx_overruns : Out(16)        received bytes lost because the link was busy, wrapping.
    busy : Out(1)                a command is visibly in progress: a token runs (``start``
                                 taken, ``done`` not yet), the state is being zeroed
                                 (``ready_state`` low), image bytes wait for the core, a reply
                                 byte waits for the transmitter, or a received byte waits for
                                 the link. Low for at most a few hundred cycles at a time while
                                 the link decodes a request or starts its reply, so "low and
                                 both lines idle for many thousand cycles" means the design has
                                 nothing left to do (the simulated board then sleeps).

    Attributes: ``hw``, ``info``, ``link``, ``core``, ``uart_rx_unit``, ``uart_tx_unit``.
    """

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    rx_errors: Out(16)
    rx_overruns: Out(16)
    busy: Out(1)

    def __init__(self, hw: HardwareConfig, *, spram: bool = False, core=None):
        if not isinstance(hw, HardwareConfig):
            raise ValueError(f"AcceleratorTop needs a mmfree.firmware.isa.HardwareConfig, "
                             f"got {type(hw).__name__}")
        self.hw = hw
        self.info = hw.info()
        # the UART units raise ValueError (with the fix) for a clock/baud pair that does not work
        self.uart_rx_unit = UARTRx(hw.clock_hz, hw.baud)
        self.uart_tx_unit = UARTTx(hw.clock_hz, hw.baud)
        self.link = LinkLayer(self.info)
        if core is None:
            from mmfree.hdl.accelerator import AcceleratorCore
            core = AcceleratorCore(hw, spram=spram)
        else:
            self._check_core(core)
        self.core = core
        super().__init__()

    def _check_core(self, core):
        if not isinstance(core, wiring.Component):
            raise ValueError(f"AcceleratorTop: core must be a wiring.Component with the core ports "
                             f"of mmfree.hdl.link.core_port_members, got {type(core).__name__}")
        members = core.signature.members
        for name, want in core_port_members(self.hw.weight_bytes, self.hw.max_vocab).items():
            if name not in members:
                if name == "header_ok":
                    continue
                raise ValueError(f"AcceleratorTop: the core {type(core).__name__} has no port "
                                 f"{name!r}; give it every port of core_port_members("
                                 f"{self.hw.weight_bytes}, {self.hw.max_vocab})")
            if members[name] != want:
                raise ValueError(f"AcceleratorTop: the core's port {name!r} is {members[name]!r}, the "
                                 f"link needs {want!r}; build the core for memory_bytes="
                                 f"{self.hw.weight_bytes} and max_vocab={self.hw.max_vocab}")

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart_rx = urx = self.uart_rx_unit
        m.submodules.uart_tx = utx = self.uart_tx_unit
        m.submodules.link = link = self.link
        m.submodules.core = core = self.core
        wiring.connect(m, urx.o_stream, link.i_rx)
        wiring.connect(m, link.o_tx, utx.i_stream)
        connect_core(m, link, core)
        m.d.comb += [
            urx.rx.eq(self.uart_rx),
            self.uart_tx.eq(utx.tx),
            self.rx_errors.eq(urx.rx_errors),
            self.rx_overruns.eq(urx.rx_overruns),
        ]

        token_running = Signal()
        with m.If(link.start.valid & link.start.ready):
            m.d.sync += token_running.eq(1)
        with m.Elif(link.done.valid & link.done.ready):
            m.d.sync += token_running.eq(0)
        m.d.comb += self.busy.eq(token_running | link.start.valid | ~link.ready_state
                                 | link.load.valid | link.o_tx.valid | urx.o_stream.valid)
        return m
