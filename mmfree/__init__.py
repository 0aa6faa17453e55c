"""mmfree-fpga: FPGA accelerators for MatMul-free language models."""

__version__ = "0.1.0"
