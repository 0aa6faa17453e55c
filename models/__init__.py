"""The model world, no HDL: float reference, integer golden model, board model files,
converter, QAT training and the shipped tiny model."""
