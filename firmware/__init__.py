"""What the on-chip sequencer runs: instruction set, assembler, program generator."""
