"""Tests of the ``mmfree`` command line (host/cli.py), run in-process through ``main`` and once
as the installed console script."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfree.host.cli import main
from mmfree.models.boardfile import board_model_bytes, read_board_model, write_board_model
from mmfree.models.checkpoint import load_checkpoint, save_checkpoint
from mmfree.models.config import ModelConfig
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import quantize_model
from mmfree.models.reference import FloatModel


CFG = ModelConfig(256, 40, 2, 48)            # byte-level: generate and eval need V = 256
TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        b"the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n")


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("MMFREE_DEBUG", raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_tensors):
    root = tmp_path_factory.mktemp("cli")
    print("seed 2718")
    ckpt = save_checkpoint(root / "ckpt", CFG, make_tensors(CFG, 2718))
    model = root / "out" / "model.mmf"
    assert main(["convert", str(ckpt), str(model)]) == 0
    text = root / "text.txt"
    text.write_bytes(TEXT)
    return root, ckpt, model, text


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 1
    assert err == f"mmfree: error: {message}\n"
    assert "Traceback" not in out + err


# --------------------------------------------------------------------------- convert

def test_convert_output_and_file(files, capsys, tmp_path):
    root, ckpt, model, _ = files
    cfg, tensors = load_checkpoint(ckpt)
    # the file equals the API's conversion with the documented defaults
    want = quantize_model(cfg, tensors, name=ckpt.resolve().name, source=str(ckpt))
    assert model.read_bytes() == board_model_bytes(want)
    out_path = tmp_path / "m8.mmf"
    rc, out, err = run(capsys, "convert", ckpt, out_path, "--lanes", 8, "--res-frac", 9, "--name", "tiny")
    assert rc == 0 and err == ""
    weights = CFG.n_layers * (4 * 40 * 40 + 3 * 40 * 48) + 256 * 40
    assert out == (f"wrote {out_path} ({out_path.stat().st_size} bytes): d=40 layers=2 I=48 V=256, "
                   f"{weights} ternary weights in 8-lane words, residual fractional bits per stage [9, 9, 9, 9, 9]\n")
    qm = read_board_model(out_path)
    assert (qm.lanes, qm.res_fracs, qm.name, qm.source) == (8, (9,) * 5, "tiny", str(ckpt))


def test_convert_calibration_text(files, capsys, tmp_path):
    root, ckpt, _, text = files
    big = tmp_path / "calib.txt"
    big.write_bytes(b"zzzz" * 64)
    out_path = tmp_path / "c.mmf"
    rc, _, _ = run(capsys, "convert", ckpt, out_path, "--calibration-text", big)
    assert rc == 0
    cfg, tensors = load_checkpoint(ckpt)
    calib = list(b"zzzz" * 64)
    want = quantize_model(cfg, tensors, calibration_tokens=calib, name=ckpt.resolve().name, source=str(ckpt))
    assert out_path.read_bytes() == board_model_bytes(want)
    default = quantize_model(cfg, tensors, name=ckpt.resolve().name, source=str(ckpt))
    assert board_model_bytes(default) != board_model_bytes(want)        # the text mattered


# --------------------------------------------------------------------------- logits

TOKENS = [72, 101, 108, 108, 111, 0, 255]


def load_npy(path, T):
    a = np.load(path)
    assert a.dtype == np.float32 and a.shape == (T, 256)
    return a


def test_logits(files, capsys, tmp_path):
    root, ckpt, model, _ = files
    toks = ",".join(map(str, TOKENS))
    paths = {k: tmp_path / k / "x.npy" for k in ("float", "integer", "model")}
    for key, extra in (("float", []), ("integer", ["--integer"])):
        rc, out, err = run(capsys, "logits", "--checkpoint", ckpt, *extra, "--tokens", toks, "--out", paths[key])
        assert rc == 0 and err == "" and out == f"wrote {paths[key]}: float32 logits [7, 256]\n"
    rc, out, _ = run(capsys, "logits", "--model", model, "--tokens", " 72, 101,108 ,108,111,0,255,", "--out", paths["model"])
    assert rc == 0
    lf, li, lm = (load_npy(paths[k], len(TOKENS)) for k in ("float", "integer", "model"))
    assert np.array_equal(lf, FloatModel.from_checkpoint(ckpt).forward(TOKENS))
    assert np.array_equal(li, lm)
    im = IntegerModel(read_board_model(model))
    assert np.array_equal(lm, (im.forward(TOKENS) / 256.0).astype(np.float32))
    assert not np.array_equal(lf, lm)                     # the two paths are really different models


# --------------------------------------------------------------------------- generate

def greedy_reference(model_path, prompt: bytes, n: int) -> str:
    m = IntegerModel(read_board_model(model_path))
    state = m.new_state()
    for b in prompt:
        logits, state = m.step(b, state)
    out = []
    for k in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        if k + 1 < n:
            logits, state = m.step(tok, state)
    return bytes(out).decode("utf-8", errors="replace")


def test_generate_greedy(files, capsys):
    _, _, model, _ = files
    rc, out1, err = run(capsys, "generate", "--model", model, "--greedy", "--max-tokens", 24, "Once upon")
    assert rc == 0 and err == ""
    assert out1.startswith("Once upon")
    assert out1 == "Once upon" + greedy_reference(model, b"Once upon", 24) + "\n"
    assert run(capsys, "generate", "--model", model, "--greedy", "--max-tokens", 24, "Once upon")[1] == out1
    assert run(capsys, "generate", "--model", model, "--max-tokens", 24, "Once upon")[1] == out1   # default
    assert run(capsys, "generate", "--model", model, "--max-tokens", 0, "Once upon")[1] == "Once upon\n"


def test_generate_temperature_seeded(files, capsys):
    _, _, model, _ = files
    argv = ["generate", "--model", model, "--temperature", "1.5", "--max-tokens", 40]
    a = run(capsys, *argv, "--seed", 3, "Hi")
    b = run(capsys, *argv, "--seed", 3, "Hi")
    c = run(capsys, *argv, "--seed", 4, "Hi")
    assert a[0] == b[0] == c[0] == 0
    assert a[1] == b[1] and a[1].startswith("Hi")
    assert c[1] != a[1]
    assert a[1] != run(capsys, "generate", "--model", model, "--max-tokens", 40, "Hi")[1]


# --------------------------------------------------------------------------- eval

def bits(logits, targets):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(targets)), targets] / np.log(2)


def test_eval_report(files, capsys):
    _, ckpt, model, text = files
    seq, chunks = 16, 3
    rc, out, err = run(capsys, "eval", "--model", model, "--checkpoint", ckpt, "--text", text,
                       "--seq-len", seq, "--chunks", chunks)
    assert rc == 0 and "Traceback" not in err
    lines = out.splitlines()
    assert lines[0] == f"fidelity of {model} (integer) vs {ckpt} (float) on {text}"
    rows = {line.split("  ")[1]: line for line in lines[1:] if line.startswith("  ")}
    for label in ("held-out positions", "bits per byte, float", "bits per byte, integer",
                  "top-1 agreement", "max |logit error|"):
        assert any(k.startswith(label) for k in rows), label
    assert f"{seq * chunks} ({chunks} chunks of {seq} bytes, zero state each)" in out
    # the figures, recomputed: windows of seq + 1 bytes at evenly spaced starts
    fm, im = FloatModel.from_checkpoint(ckpt), IntegerModel(read_board_model(model))
    starts = [k * (len(TEXT) - seq - 1) // (chunks - 1) for k in range(chunks)]
    fb, ib, agree = [], [], []
    for s in starts:
        w = list(TEXT[s:s + seq + 1])
        lf = fm.forward(w[:-1]).astype(np.float64)
        li = im.forward(w[:-1]) / 256.0
        fb.append(bits(lf, np.array(w[1:])))
        ib.append(bits(li, np.array(w[1:])))
        agree.append(lf.argmax(1) == li.argmax(1))
    float_bpb, int_bpb = np.concatenate(fb).mean(), np.concatenate(ib).mean()
    top1 = np.concatenate(agree).mean()
    assert f"bits per byte, float    {float_bpb:.4f}" in out
    assert f"bits per byte, integer  {int_bpb:.4f}" in out
    assert f"top-1 agreement         {100 * top1:.2f}%" in out
    passed = top1 >= 0.98 and abs(int_bpb / float_bpb - 1) <= 0.02
    assert lines[-1].startswith(f"  verdict: {'PASS' if passed else 'FAIL'} (")
    # --strict: status 3 exactly when a target is missed
    rc, _, _ = run(capsys, "eval", "--model", model, "--checkpoint", ckpt, "--text", text,
                   "--seq-len", seq, "--chunks", chunks, "--strict")
    assert rc == (0 if passed else 3)


def test_eval_finds_recorded_checkpoint(files, capsys):
    _, ckpt, model, text = files                     # model is not in ckpt: found via its source
    rc, out, _ = run(capsys, "eval", "--model", model, "--text", text, "--seq-len", 8, "--chunks", 2)
    assert rc == 0 and f"vs {ckpt} (float)" in out


# --------------------------------------------------------------------------- errors

def test_error_missing_files(files, capsys, tmp_path):
    root, ckpt, model, text = files
    nope = tmp_path / "nope.mmf"
    assert_error(capsys, ["logits", "--model", nope, "--tokens", "1", "--out", tmp_path / "x.npy"],
                 f"{nope} does not exist")
    assert_error(capsys, ["generate", "--model", nope, "hi"], f"{nope} does not exist")
    assert_error(capsys, ["convert", tmp_path / "nodir", tmp_path / "y.mmf"],
                 f"{tmp_path / 'nodir'} is not a checkpoint directory")
    assert_error(capsys, ["logits", "--checkpoint", tmp_path / "nodir", "--tokens", "1", "--out", tmp_path / "x.npy"],
                 f"{tmp_path / 'nodir'} is not a checkpoint directory")
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.mmf").exists()


@pytest.mark.parametrize("tokens, message", [
    ("1,x,3", "--tokens must be comma-separated integers like 1,5,9, not '1,x,3'"),
    ("1.5", "--tokens must be comma-separated integers like 1,5,9, not '1.5'"),
    ("1;2", "--tokens must be comma-separated integers like 1,5,9, not '1;2'"),
    (",", "--tokens is empty; give at least one token id"),
    (" ", "--tokens is empty; give at least one token id"),
])
def test_error_malformed_tokens(files, capsys, tmp_path, tokens, message):
    _, ckpt, model, _ = files
    assert_error(capsys, ["logits", "--model", model, "--tokens", tokens, "--out", tmp_path / "x.npy"], message)
    assert_error(capsys, ["logits", "--checkpoint", ckpt, "--tokens", tokens, "--out", tmp_path / "x.npy"], message)
    assert not (tmp_path / "x.npy").exists()


def test_error_token_out_of_range(files, capsys, tmp_path):
    _, ckpt, model, _ = files
    out = tmp_path / "x.npy"
    for argv in (["--model", model], ["--checkpoint", ckpt, "--integer"]):
        assert_error(capsys, ["logits", *argv, "--tokens", "1,256", "--out", out],
                     "token id 256 is outside the vocabulary [0, 256)")
        assert_error(capsys, ["logits", *argv, "--tokens", "-1", "--out", out],
                     "token id -1 is outside the vocabulary [0, 256)")
    assert_error(capsys, ["logits", "--checkpoint", ckpt, "--tokens", "300", "--out", out],
                 "token id 300 is out of range for a vocabulary of 256 tokens (0..255)")
    assert not out.exists()


def test_error_corrupt_board_file(files, capsys, tmp_path):
    _, _, model, _ = files
    bad = tmp_path / "bad.mmf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad.write_bytes(bytes(data))
    assert_error(capsys, ["logits", "--model", bad, "--tokens", "1", "--out", tmp_path / "x.npy"],
                 f"{bad}: CRC mismatch: the file is corrupted")
    assert_error(capsys, ["generate", "--model", bad, "hi"], f"{bad}: CRC mismatch: the file is corrupted")
    bad.write_bytes(bytes(data[:100]))
    assert_error(capsys, ["eval", "--model", bad], f"{bad}: file is truncated: the header announces "
                 f"{len(data) - 24} payload bytes, 76 are there")


def test_error_integer_with_model(files, capsys, tmp_path):
    _, _, model, _ = files
    assert_error(capsys, ["logits", "--model", model, "--integer", "--tokens", "1", "--out", tmp_path / "x.npy"],
                 "--integer goes with --checkpoint; a --model file is always run on the integer model")
    assert not (tmp_path / "x.npy").exists()


def test_error_other_bad_input(files, capsys, tmp_path, make_tensors):
    root, ckpt, model, text = files
    assert_error(capsys, ["convert", ckpt, tmp_path / "z.mmf", "--res-frac", "15"],
                 "res_frac must be in [0, 14], not 15")
    assert_error(capsys, ["generate", "--model", model, "--temperature", "0", "hi"],
                 "temperature must be positive, not 0.0")
    assert_error(capsys, ["eval", "--model", model, "--checkpoint", ckpt, "--text", text, "--seq-len", 500],
                 f"the held-out text has {len(TEXT)} bytes; at least 501 are needed")
    # a model whose checkpoint cannot be found
    cfg, tensors = load_checkpoint(ckpt)
    lone = write_board_model(quantize_model(cfg, tensors, res_frac=9), tmp_path / "lone.mmf")
    assert_error(capsys, ["eval", "--model", lone, "--text", text],
                 f"cannot find the float checkpoint of {lone} (recorded source: none); pass it with --checkpoint DIR")
    # text prompts need a byte-level model
    small = ModelConfig(40, 24, 1, 20)
    other = write_board_model(quantize_model(small, make_tensors(small, 1), res_frac=9), tmp_path / "v40.mmf")
    assert_error(capsys, ["generate", "--model", other, "hi"],
                 "text prompts need a byte-level model (vocabulary 256); this model has 40 tokens: "
                 "give token ids instead")


@pytest.mark.parametrize("argv", [[], ["convert"], ["logits"], ["generate"], ["eval"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--help"])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: mmfree") and err == ""


def test_installed_console_script(files, tmp_path):
    _, _, model, _ = files
    script = Path(sys.executable).parent / "mmfree"
    assert script.exists(), script
    bad = tmp_path / "bad.mmf"
    bad.write_bytes(b"MMFBOARX" + model.read_bytes()[8:])
    env = {k: v for k, v in os.environ.items() if k != "MMFREE_DEBUG"}
    proc = subprocess.run([str(script), "logits", "--model", str(bad), "--tokens", "1,2", "--out",
                           str(tmp_path / "x.npy")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == f"mmfree: error: {bad}: not an mmfree board model file (no MMFBOARD magic at the start)\n"
    assert proc.stdout == ""
