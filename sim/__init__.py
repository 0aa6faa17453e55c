"""Simulation: cocotb testbenches and the simulated board."""
