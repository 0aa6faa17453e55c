"""QAT training (the `train` extra), the PyTorch model against the NumPy float reference, and
the corpus split."""

import json
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the train extra (torch) is installed by `make test`")

from mmfree.models.checkpoint import load_checkpoint, save_checkpoint
from mmfree.models.config import ModelConfig
from mmfree.models.corpus import SEPARATOR, VAL_MODULUS, CorpusError, cookies, load_corpus
from mmfree.models.quantized import snap_embeddings
from mmfree.models.reference import FloatModel
from mmfree.models.torch_model import HGRNBitLM
from mmfree.models.train import main as train_main


@pytest.mark.parametrize("d,L,I,V,lb", [(40, 2, 64, 97, True), (72, 1, 96, 256, False), (24, 3, 48, 50, True)])
@pytest.mark.parametrize("scan", ["parallel", "sequential"])
def test_torch_model_matches_numpy_reference(d, L, I, V, lb, scan, make_tensors):
    """Two independent implementations of MODEL.md: PyTorch (training) and NumPy (reference)."""
    seed = d * 1000 + L
    print("seed", seed)
    cfg = ModelConfig(V, d, L, I, use_lower_bound=lb)
    tensors = make_tensors(cfg, seed)
    tokens = np.random.default_rng(seed).integers(0, V, 24)
    ref = FloatModel(cfg, tensors, dtype=np.float64).forward(tokens)
    model = HGRNBitLM.from_tensors(cfg, tensors, scan=scan).double().eval()
    with torch.no_grad():
        got = model(torch.from_numpy(tokens)[None]).numpy()[0]
    # The int8 activation rounding is discontinuous: a last-bit difference can flip one
    # activation by one step, so compare closely but allow rare isolated flips.
    close = np.isclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert close.mean() > 0.97, f"only {close.mean():.3f} of logits agree"
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_smoke_training_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    rc = train_main(["--out", str(out), "--steps", "3", "--hidden-size", "32", "--layers", "1",
                     "--intermediate-size", "64", "--seq-len", "32", "--batch", "4", "--device", "cpu",
                     "--threads", "1", "--eval-bytes", "4000", "--samples", "1", "--sample-bytes", "20",
                     "--no-progress"])
    assert rc == 0
    cfg, tensors = load_checkpoint(out)
    assert (cfg.d, cfg.n_layers, cfg.intermediate_size, cfg.vocab_size) == (32, 1, 64, 256)
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3 and info["embeddings_snapped"] is True
    assert 0 < info["val_bits_per_byte"] < 9
    emb = tensors["model.embeddings.weight"]
    assert np.array_equal(snap_embeddings(emb), emb)
    # what was trained is what the float reference computes
    toks = np.arange(10) * 7
    model = HGRNBitLM.from_tensors(cfg, tensors, scan="sequential").eval()
    with torch.no_grad():
        got = model(torch.from_numpy(toks)[None]).numpy()[0]
    assert np.allclose(got, FloatModel(cfg, tensors).forward(toks), atol=1e-3 * np.abs(got).max())


def test_checkpoint_round_trip_through_torch(tmp_path):
    cfg = ModelConfig(256, 32, 2, 64)
    model = HGRNBitLM(cfg)
    save_checkpoint(tmp_path, cfg, model.to_tensors())
    again = HGRNBitLM.from_tensors(cfg, load_checkpoint(tmp_path)[1])
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_corpus_split_is_deterministic_and_disjoint():
    val, train = cookies("val"), cookies("train")
    assert val and train and len(val) < 0.1 * len(train)
    assert all(zlib.crc32(c) % VAL_MODULUS == 0 for c in val)
    assert not set(val) & set(train)
    assert load_corpus("val") == b"".join(c + SEPARATOR for c in val)


def test_corpus_missing_says_what_to_install(tmp_path):
    with pytest.raises(CorpusError, match=r"apt-get install fortunes fortunes-min"):
        load_corpus("train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        load_corpus("test")
