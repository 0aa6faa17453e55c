"""Shared fixtures: random float checkpoints of realistic scale."""

import numpy as np
import pytest

from mmfree.models.checkpoint import tensor_shapes


def random_tensors(cfg, seed, *, norm_sd=0.3, lb_sd=1.0, weight_sd=0.05):
    """Every tensor of ``cfg`` drawn with the scales of a trained model: norm weights
    ~ 1 ± norm_sd, latent projection weights ~ N(0, weight_sd) (``weight_sd=None``: a scale
    drawn per matrix from [0.01, 0.1]), embeddings ~ N(0, 1), lower bounds ~ N(0, lb_sd)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            a = rng.normal(1.0, norm_sd, shape)
        elif name == "model.lower_bounds":
            a = rng.normal(0.0, lb_sd, shape)
        elif name == "model.embeddings.weight":
            a = rng.normal(0.0, 1.0, shape)
        else:
            a = rng.normal(0.0, rng.uniform(0.01, 0.1) if weight_sd is None else weight_sd, shape)
        out[name] = a.astype(np.float32)
    return out


@pytest.fixture(scope="session")
def make_tensors():
    """``make_tensors(cfg, seed)``: see :func:`random_tensors`."""
    return random_tensors
