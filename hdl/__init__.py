"""Amaranth gateware components of the accelerator."""
