"""Shared fixtures: random float checkpoints of realistic scale."""

import numpy as np
import pytest

from mmfree.models.checkpoint import tensor_shapes


def random_tensors(cfg, seed):
    """Every tensor of ``cfg`` drawn with the scales of a trained model: norm weights ~ 1 ± 0.3,
    latent projection weights ~ N(0, 0.05), embeddings ~ N(0, 1), lower bounds ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            a = rng.normal(1.0, 0.3, shape)
        elif name == "model.lower_bounds":
            a = rng.normal(0.0, 1.0, shape)
        elif name == "model.embeddings.weight":
            a = rng.normal(0.0, 1.0, shape)
        else:
            a = rng.normal(0.0, 0.05, shape)
        out[name] = a.astype(np.float32)
    return out


@pytest.fixture(scope="session")
def make_tensors():
    """``make_tensors(cfg, seed)``: see :func:`random_tensors`."""
    return random_tensors
