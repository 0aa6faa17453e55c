"""The shipped tiny model: its board file is what the converter makes of its checkpoint, the
integer golden model meets the fidelity targets against the float reference, and it fits the
iCEBreaker."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfree.models.boardfile import board_model_bytes, read_board_model
from mmfree.models.checkpoint import load_checkpoint
from mmfree.models.corpus import load_corpus
from mmfree.models.fidelity import BPB_TOLERANCE, TOP1_TARGET, measure_fidelity
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import quantize_model, snap_embeddings
from mmfree.models.reference import FloatModel

SHIPPED = Path(__file__).resolve().parents[1] / "models/shipped/tiny-fortunes"
BOARD_FILE = SHIPPED / "tiny-fortunes.mmf"
SPRAM_BYTES = 4 * 32 * 1024          # iCE40UP5K: four 256 Kbit SPRAMs


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(SHIPPED)


def test_board_file_is_the_conversion_of_the_checkpoint(checkpoint):
    """Guards against the shipped file drifting from the converter and the arithmetic."""
    cfg, tensors = checkpoint
    qm = quantize_model(cfg, tensors, name="tiny-fortunes", source="models/shipped/tiny-fortunes")
    assert board_model_bytes(qm) == BOARD_FILE.read_bytes()


def test_embeddings_are_snapped(checkpoint):
    _, tensors = checkpoint
    emb = tensors["model.embeddings.weight"]
    assert np.array_equal(snap_embeddings(emb), emb)


def test_fits_the_icebreaker_spram(checkpoint):
    cfg, _ = checkpoint
    trit_bytes = cfg.ternary_weights() // 4
    embedding_bytes = cfg.vocab_size * cfg.d
    print(f"ternary {trit_bytes} B + embeddings {embedding_bytes} B of {SPRAM_BYTES} B SPRAM")
    assert trit_bytes + embedding_bytes <= 0.9 * SPRAM_BYTES


def test_fidelity_targets(checkpoint):
    """Integer golden model vs float reference on held-out text (docs/arithmetic.md)."""
    cfg, tensors = checkpoint
    report = measure_fidelity(FloatModel(cfg, tensors), IntegerModel(read_board_model(BOARD_FILE)),
                              load_corpus("val"))
    print(report.format("shipped model"))
    assert report.top1_agreement >= TOP1_TARGET
    assert abs(report.bpb_ratio - 1) <= BPB_TOLERANCE
    assert report.float_bpb < 2.5          # the model has learned the corpus (8.0 is chance)


def test_generates_english_looking_text():
    out = subprocess.run([sys.executable, "-m", "mmfree.host.cli", "generate", "--model", str(BOARD_FILE),
                          "--max-tokens", "120", "--temperature", "0.8", "--seed", "1", "Q: What is "],
                         capture_output=True, text=True, check=True).stdout
    text = out[len("Q: What is "):]
    words = text.split()
    print(out)
    # mostly printable ASCII, words of ordinary length: text, not noise
    assert sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in text) >= 0.95 * len(text)
    assert len(words) >= 10 and 2 <= np.mean([len(w) for w in words]) <= 8
