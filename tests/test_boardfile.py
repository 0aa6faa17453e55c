"""Tests of board model files (models/boardfile.py).

Files with a valid CRC but bad contents are built here from the documented layout: a
safetensors payload (``safetensors.numpy.save`` with the ``mmfree`` metadata JSON) behind a
24-byte envelope ``<8sIQI`` (magic, format version, payload length, zlib.crc32 of the payload).
"""

import dataclasses
import json
import struct
import zlib

import numpy as np
import pytest
from safetensors.numpy import load, save

from mmfree.models import boardfile
from mmfree.models.boardfile import (BoardFileError, board_model_bytes, pack_trits, parse_board_model,
                                     read_board_model, unpack_trits, write_board_model)
from mmfree.models.config import ModelConfig
from mmfree.models.golden import IntegerModel
from mmfree.models.quantized import quantize_model


ENVELOPE = struct.Struct("<8sIQI")
CODE = {0: 0b00, 1: 0b01, -1: 0b11}


# --------------------------------------------------------------------------- trit packing

def reference_pack(T, lanes):
    """The documented layout with Python ints: output rows in groups of ``lanes`` (zero rows
    pad the last group); per group and input column a little-endian word of ``lanes`` trits,
    lane k in bits 2k+1..2k."""
    rows, n = T.shape
    groups = -(-rows // lanes)
    out = np.zeros((groups, n, lanes // 4), dtype=np.uint8)
    for g in range(groups):
        for j in range(n):
            word = 0
            for k in range(lanes):
                r = g * lanes + k
                if r < rows:
                    word |= CODE[int(T[r, j])] << (2 * k)
            out[g, j] = list(word.to_bytes(lanes // 4, "little"))
    return out


@pytest.mark.parametrize("lanes", [8, 16, 32, 64])
def test_pack_unpack_round_trip(lanes):
    rng = np.random.default_rng(lanes)
    print(f"seed {lanes}")
    for rows in (1, lanes - 1, lanes, lanes + 1, 3 * lanes + 5):
        for n in (1, 7, 40):
            T = rng.integers(-1, 2, (rows, n)).astype(np.int8)
            packed = pack_trits(T, lanes)
            assert packed.dtype == np.uint8
            assert packed.shape == (-(-rows // lanes), n, lanes // 4)
            assert np.array_equal(packed, reference_pack(T, lanes))
            back = unpack_trits(packed, rows)
            assert back.dtype == np.int8 and np.array_equal(back, T)


def test_pack_bit_positions_hand_built():
    # lanes 8, 10 rows (group 1 is rows 8, 9 and six zero padding rows), 2 columns
    T = np.zeros((10, 2), dtype=np.int8)
    T[:8, 0] = [1, -1, 0, 1, 0, 0, -1, 1]
    T[8:, 0] = [-1, 1]
    T[0, 1] = -1
    T[9, 1] = -1
    packed = pack_trits(T, 8)
    # column 0, group 0: codes lane0..7 = 01 11 00 01 | 00 00 11 01
    #   byte 0 = lane3 lane2 lane1 lane0 = 01 00 11 01, byte 1 = lane7..4 = 01 11 00 00
    assert packed[0, 0].tolist() == [0b01001101, 0b01110000]
    assert packed[0, 1].tolist() == [0b00000011, 0]                 # lane 0 = -1
    assert packed[1, 0].tolist() == [0b00000111, 0]                 # lane 0 = -1, lane 1 = +1
    assert packed[1, 1].tolist() == [0b00001100, 0]                 # lane 1 = -1
    assert packed.shape == (2, 2, 2)


def test_pack_rejects_non_trits():
    with pytest.raises(ValueError, match=r"^trits must be -1, 0 or \+1$"):
        pack_trits(np.array([[0, 2]], dtype=np.int8), 8)
    with pytest.raises(ValueError, match=r"^trits must be -1, 0 or \+1$"):
        pack_trits(np.array([[-2, 0]], dtype=np.int8), 8)


def test_unpack_rejects_code_10_and_padding():
    packed = pack_trits(np.ones((5, 3), dtype=np.int8), 8)
    bad = packed.copy()
    bad[0, 2, 1] |= 0b10 << 4                      # lane 6 of column 2 = 0b10 (a padding row, too)
    with pytest.raises(ValueError, match=r"^holds the invalid trit code 0b10$"):
        unpack_trits(bad, 5)
    bad = packed.copy()
    bad[0, 1, 1] = 0b01 << 2                       # lane 5 = +1, row 5 is padding
    with pytest.raises(ValueError, match=r"^has non-zero trits in the padding rows$"):
        unpack_trits(bad, 5)
    assert np.array_equal(unpack_trits(bad, 6)[5], [0, 1, 0])


# --------------------------------------------------------------------------- round trip

@pytest.fixture(scope="module")
def models(make_tensors):
    out = {}
    for key, cfg, lanes, rf in (("lb", ModelConfig(40, 40, 2, 48), 32, 9),
                                ("nolb", ModelConfig(70, 24, 1, 20, use_lower_bound=False), 8, 9),
                                ("wide", ModelConfig(100, 72, 2, 40, rms_norm_eps=1e-5), 64, [12, 11, 10, 10, 9])):
        qm = quantize_model(cfg, make_tensors(cfg, len(key)), res_frac=rf, o_frac=13, u_frac=12,
                            lanes=lanes, name=f"test-{key}", source=f"/nowhere/{key}")
        print(f"{key}: seed {len(key)}")
        qm.meta = {"note": "ünïcode", "n": 3}
        out[key] = qm
    return out


def assert_same_model(a, b):
    """Every field of two QuantizedModels (recursively through the dataclasses) is identical."""
    def same(x, y, where):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            assert type(x) is type(y), where
            for f in dataclasses.fields(x):
                same(getattr(x, f.name), getattr(y, f.name), f"{where}.{f.name}")
        elif isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y), where
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for k, (p, q) in enumerate(zip(x, y)):
                same(p, q, f"{where}[{k}]")
        else:
            assert type(x) is type(y) and x == y, (where, x, y)
    same(a, b, "qm")


@pytest.mark.parametrize("key", ["lb", "nolb", "wide"])
def test_round_trip(models, key):
    qm = models[key]
    data = board_model_bytes(qm)
    back = parse_board_model(data)
    assert_same_model(qm, back)
    assert board_model_bytes(back) == data
    toks = [0, 5, qm.cfg.vocab_size - 1, 3, 3]
    assert np.array_equal(IntegerModel(back).forward(toks), IntegerModel(qm).forward(toks))


def test_envelope_layout(models):
    data = board_model_bytes(models["lb"])
    magic, version, length, crc = ENVELOPE.unpack_from(data)
    assert (magic, version) == (b"MMFBOARD", 1)
    assert length == len(data) - 24 and crc == zlib.crc32(data[24:])
    tensors, meta = split(data)
    assert meta["format"] == "mmfree-board" and meta["arith_version"] == 1
    assert tensors["layers.0.i_proj.trits"].shape == (2, 40, 8)     # 40 rows in 32-lane groups
    assert tensors["lm_head.trits"].shape == (2, 40, 8)
    assert "layers.0.lower_bound" not in tensors and tensors["layers.1.lower_bound"].dtype == np.uint16


def test_write_is_atomic(models, tmp_path, monkeypatch):
    qm = models["lb"]
    path = tmp_path / "sub" / "m.mmf"
    assert write_board_model(qm, path) == path
    assert path.read_bytes() == board_model_bytes(qm)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.mmf"]
    assert_same_model(read_board_model(path), qm)
    # overwrite with another model; then a failing rename leaves the old file and no temp file
    other = models["nolb"]
    write_board_model(other, path)
    assert path.read_bytes() == board_model_bytes(other)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(boardfile.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_board_model(qm, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.mmf"]
    assert path.read_bytes() == board_model_bytes(other)


# --------------------------------------------------------------------------- strict loader

def split(data):
    """Decode a file into (tensors, metadata) from the documented layout."""
    payload = data[ENVELOPE.size:]
    (hlen,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8:8 + hlen])
    return dict(load(payload)), json.loads(header["__metadata__"]["mmfree"])


def envelope(payload, version=1, magic=b"MMFBOARD", length=None, crc=None):
    return ENVELOPE.pack(magic, version, len(payload) if length is None else length,
                         zlib.crc32(payload) if crc is None else crc) + payload


def build(tensors, meta):
    """A file with a valid envelope and CRC around arbitrary contents."""
    payload = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                   metadata={"mmfree": json.dumps(meta)})
    return envelope(payload)


def rejected(data, message):
    with pytest.raises(BoardFileError) as exc:
        parse_board_model(data)
    assert str(exc.value) == message
    return exc


@pytest.fixture(scope="module")
def good(models):
    return board_model_bytes(models["lb"])


def test_rebuilt_file_is_accepted(good, models):
    # the helpers above rebuild a valid file: so every rejection below is caused by its change
    tensors, meta = split(good)
    assert_same_model(parse_board_model(build(tensors, meta)), models["lb"])


def test_truncated(good):
    n = len(good) - 24
    for cut in (24, 25, 100, len(good) // 2, len(good) - 1):
        rejected(good[:cut], f"file is truncated: the header announces {n} payload bytes, {cut - 24} are there")


@pytest.mark.parametrize("cut", [8, 12, 20, 23])
def test_truncated_inside_envelope(good, cut):
    with pytest.raises(BoardFileError, match="truncated"):
        parse_board_model(good[:cut])


def test_extra_bytes(good):
    rejected(good + b"\0" * 5, "file has 5 unexpected bytes after the payload")


def test_bit_flips_anywhere_in_payload(good):
    rng = np.random.default_rng(8)
    print("seed 8")
    positions = [24, 25, 31, 32, len(good) - 1] + rng.integers(24, len(good), 60).tolist()
    for pos in positions:
        for bit in (0, 7) if pos < 40 else (int(rng.integers(0, 8)),):
            bad = bytearray(good)
            bad[pos] ^= 1 << bit
            rejected(bytes(bad), "CRC mismatch: the file is corrupted")
    bad = bytearray(good)
    bad[20] ^= 1                                    # the CRC field itself
    rejected(bytes(bad), "CRC mismatch: the file is corrupted")


def test_bad_magic_and_empty(good):
    msg = "not an mmfree board model file (no MMFBOARD magic at the start)"
    rejected(b"MMFBOARX" + good[8:], msg)
    rejected(b"", msg)
    rejected(b"PK\x03\x04" + good[4:], msg)


@pytest.mark.parametrize("version", [0, 2, 2 ** 32 - 1])
def test_wrong_format_version(good, version):
    rejected(envelope(good[24:], version=version),
             f"board model file format version {version} is not supported (this mmfree reads "
             f"version 1); convert the checkpoint again")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_arith_version(good, version):
    tensors, meta = split(good)
    meta["arith_version"] = version
    rejected(build(tensors, meta), f"file was made for arithmetic version {version}, this mmfree "
                                   f"implements version 1; convert the checkpoint again")


def test_not_a_board_payload(good):
    tensors, meta = split(good)
    meta["format"] = "something-else"
    rejected(build(tensors, meta), "payload is not an mmfree board model")
    rejected(envelope(b"\x10" + b"\0" * 7 + b"not json at all!"), "payload is not a valid board model (JSONDecodeError)")
    payload = save({"x": np.zeros(2, np.int8)})            # no mmfree metadata
    rejected(envelope(payload), "payload is not a valid board model (KeyError)")


def modify(good, change):
    tensors, meta = split(good)
    change(tensors, meta)
    return build(tensors, meta)


def test_wrong_shape(good):
    rejected(modify(good, lambda t, m: t.update({"embed.scale": np.zeros(41, np.uint16)})),
             "tensor embed.scale has shape [41], the configuration implies [40]")
    rejected(modify(good, lambda t, m: t.update({"layers.1.g_proj.trits": t["layers.1.g_proj.trits"][:, :, :4]})),
             "tensor layers.1.g_proj.trits has shape [2, 40, 4], the configuration implies [2, 40, 8]")
    rejected(modify(good, lambda t, m: t.update({"lm_head.g": np.zeros((1, 40), np.int16)})),
             "tensor lm_head.g has shape [1, 40], the configuration implies [40]")


def test_wrong_dtype(good):
    rejected(modify(good, lambda t, m: t.update({"layers.0.attn_norm.w": t["layers.0.attn_norm.w"].astype(np.int32)})),
             "tensor layers.0.attn_norm.w has dtype int32, expected int16")
    rejected(modify(good, lambda t, m: t.update({"embed.q": t["embed.q"].astype(np.uint8)})),
             "tensor embed.q has dtype uint8, expected int8")
    rejected(modify(good, lambda t, m: t.update({"sigmoid_lut": t["sigmoid_lut"].astype(np.float32)})),
             "tensor sigmoid_lut has dtype float32, expected uint16")


@pytest.mark.parametrize("name", ["embed.q", "sigmoid_lut", "layers.1.lower_bound", "lm_head.g",
                                  "layers.0.down_proj.trits", "final_norm.w"])
def test_missing_tensor(good, name):
    rejected(modify(good, lambda t, m: t.pop(name)), f"tensor {name} is missing")


def test_extra_tensor(good):
    rejected(modify(good, lambda t, m: t.update({"bogus": np.zeros(3, np.int8)})),
             "tensor bogus is not part of a model of this configuration")
    rejected(modify(good, lambda t, m: t.update({"layers.0.lower_bound": t["layers.1.lower_bound"]})),
             "tensor layers.0.lower_bound is not part of a model of this configuration")


def test_invalid_trit_code(good):
    def change(t, m):
        a = t["layers.1.f_proj.trits"].copy()
        a[0, 3, 2] = (a[0, 3, 2] & ~np.uint8(0b11 << 4)) | np.uint8(0b10 << 4)
        t["layers.1.f_proj.trits"] = a
    rejected(modify(good, change), "tensor layers.1.f_proj.trits holds the invalid trit code 0b10")


def test_nonzero_padding_rows(good):
    def change(t, m):
        a = t["lm_head.trits"].copy()           # V = 40: group 1 holds rows 32..39, lanes 8..31 are padding
        a[1, 0, 2] = 0b01                       # lane 8 = row 40 := +1
        t["lm_head.trits"] = a
    rejected(modify(good, change), "tensor lm_head.trits has non-zero trits in the padding rows")


def test_lower_bound_range(good, models):
    def set_lb(v):
        def change(t, m):
            a = t["layers.1.lower_bound"].copy()
            a[5] = v
            t["layers.1.lower_bound"] = a
        return change
    rejected(modify(good, set_lb(32769)), "tensor layers.1.lower_bound exceeds 32768 (1.0 in Q1.15)")
    rejected(modify(good, set_lb(65535)), "tensor layers.1.lower_bound exceeds 32768 (1.0 in Q1.15)")
    qm = parse_board_model(modify(good, set_lb(32768)))
    assert int(qm.layers[1].lower_bound[5]) == 32768


def test_table_and_embedding_ranges(good):
    msg = "tensor sigmoid_lut differs from the table of arithmetic version 1"

    def swap(t, m):                             # no longer monotone
        a = t["sigmoid_lut"].copy()
        a[10], a[11] = a[11], a[10]
        t["sigmoid_lut"] = a
    rejected(modify(good, swap), msg)

    def bump(t, m):                             # still monotone, one LSB off
        a = t["sigmoid_lut"].copy()
        a[100] += 1
        t["sigmoid_lut"] = a
    rejected(modify(good, bump), msg)
    rejected(modify(good, lambda t, m: t.update({"sigmoid_lut": np.full(256, 32769, np.uint16)})), msg)

    def emb(t, m):
        a = t["embed.q"].copy()
        a[3, 4] = -128
        t["embed.q"] = a
    rejected(modify(good, emb), "tensor embed.q holds -128, outside the int8 range [-127, 127]")


def set_meta(path, value):
    def change(t, m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return change


@pytest.mark.parametrize("path, value, message", [
    (("res_fracs",), [9, 9, 9], "header: res_fracs must list 5 formats (2L+1), not [9, 9, 9]"),
    (("res_fracs",), 9, "header: metadata field 'res_fracs' must be a JSON array, not 9"),
    (("res_fracs",), [9, 9, 15, 9, 9], "header: res_fracs[2] = 15 is outside [0, 14]"),
    (("res_fracs",), [9, 9, 9, 9, -1], "header: res_fracs[4] = -1 is outside [0, 14]"),
    (("res_fracs",), [9, True, 9, 9, 9], "header: res_fracs[1] = True is outside [0, 14]"),
    (("res_fracs",), [9, 9.0, 9, 9, 9], "header: res_fracs[1] = 9.0 is outside [0, 14]"),
    (("res_fracs",), [9, "9", 9, 9, 9], "header: res_fracs[1] = '9' is outside [0, 14]"),
    (("res_fracs",), [9, 10, 10, 10, 10], "header: res_fracs [9, 10, 10, 10, 10] increase along the network"),
    (("layers",), [{"o_frac": 9, "u_frac": 9}],
     "header: layers must list 2 objects of layer formats, not [{'o_frac': 9, 'u_frac': 9}]"),
    (("layers", 1, "o_frac"), 15, "layers.1: o_frac = 15 is outside [0, 14]"),
    (("layers", 0, "u_frac"), -1, "layers.0: u_frac = -1 is outside [0, 14]"),
    (("bitlinears", "layers.0.g_proj", "out_frac"), 16, "layers.0.g_proj: out_frac = 16 is outside [0, 15]"),
    (("emb_shift",), 25, "header: emb_shift = 25 is outside [0, 24]"),
    (("lanes",), 12, "lanes = 12 is not one of 8, 16, 32, 64"),
    (("lanes",), "32", "header: metadata field 'lanes' must be a JSON integer, not '32'"),
    (("norms", "layers.0.attn_norm", "w_frac"), 16, "layers.0.attn_norm: w_frac = 16 is outside [0, 15]"),
    (("norms", "layers.1.g_norm", "out_frac"), -1, "layers.1.g_norm: out_frac = -1 is outside [0, 15]"),
    (("norms", "final_norm", "eps_q"), 0, "final_norm: eps_q = 0 is outside [1, 4294967295]"),
    (("norms", "final_norm", "eps_q"), 2 ** 32, "final_norm: eps_q = 4294967296 is outside [1, 4294967295]"),
    (("bitlinears", "lm_head", "gamma_mant"), 32767, "lm_head: gamma_mant = 32767 is outside [32768, 65535]"),
    (("bitlinears", "lm_head", "gamma_mant"), 65536, "lm_head: gamma_mant = 65536 is outside [32768, 65535]"),
    (("bitlinears", "layers.0.i_proj", "gamma_exp"), 97, "layers.0.i_proj: gamma_exp = 97 is outside [-64, 96]"),
    (("bitlinears", "layers.0.i_proj", "gamma_exp"), -65, "layers.0.i_proj: gamma_exp = -65 is outside [-64, 96]"),
    (("bitlinears", "layers.1.gate_proj", "g_frac"), 25, "layers.1.gate_proj: g_frac = 25 is outside [0, 24]"),
    (("bitlinears", "lm_head", "out_frac"), 9, "lm_head: out_frac = 9 is outside [8, 8]"),
    (("bitlinears", "layers.0.o_proj", "out_frac"), 10, "layers.0.o_proj: out_frac = 10 is outside [9, 9]"),
    (("bitlinears", "layers.0.f_proj", "eps_q"), 0, "layers.0.f_proj: eps_q = 0 is outside [1, 4294967295]"),
    (("bitlinears", "layers.0.f_proj", "rows"), 41, "layers.0.f_proj: rows = 41, the configuration implies 40"),
    (("bitlinears", "lm_head", "gamma"), 0.0, "lm_head: gamma must be positive, not 0.0"),
    (("bitlinears", "lm_head", "gamma"), -1.5, "lm_head: gamma must be positive, not -1.5"),
    (("config", "hidden_size"), 0, "config field hidden_size must be a positive integer, not 0"),
])
def test_metadata_out_of_range(good, path, value, message):
    rejected(modify(good, set_meta(path, value)), message)


@pytest.mark.parametrize("key", ["res_fracs", "emb_shift", "lanes", "layers", "norms", "bitlinears"])
def test_metadata_missing_field(good, key):
    rejected(modify(good, lambda t, m: m.pop(key)),
             f"header: metadata field '{key}' is missing (the file was made by another version of "
             "mmfree); convert the checkpoint again")


def test_metadata_gamma_not_a_number(good):
    with pytest.raises(BoardFileError, match="gamma"):
        parse_board_model(modify(good, set_meta(("bitlinears", "lm_head", "gamma"), "abc")))


def test_metadata_lanes_float(good):
    with pytest.raises(BoardFileError, match="lanes"):
        parse_board_model(modify(good, set_meta(("lanes",), 32.0)))


@pytest.mark.parametrize("case", ["norms-list", "meta-list"])
def test_metadata_wrong_json_type(good, case):
    tensors, meta = split(good)
    if case == "norms-list":
        meta["norms"] = []
    else:
        meta = [meta]
    with pytest.raises(BoardFileError) as exc:
        parse_board_model(build(tensors, meta))
    assert "list indices" not in str(exc.value)


def test_file_of_the_previous_layout_asks_for_conversion(good):
    def old_layout(t, m):                       # what the converter wrote before per-stage formats
        m["res_frac"] = m.pop("res_fracs")[0]
        m.pop("layers")
    with pytest.raises(BoardFileError, match="convert the checkpoint again"):
        parse_board_model(modify(good, old_layout))


def test_read_board_model_names_the_file(good, tmp_path):
    path = tmp_path / "bad.mmf"
    path.write_bytes(good[:-3])
    with pytest.raises(BoardFileError) as exc:
        read_board_model(path)
    assert str(exc.value) == (f"{path}: file is truncated: the header announces {len(good) - 24} payload "
                              f"bytes, {len(good) - 27} are there")
    with pytest.raises(BoardFileError) as exc:
        read_board_model(tmp_path / "nope.mmf")
    assert str(exc.value) == f"{tmp_path / 'nope.mmf'} does not exist"
    with pytest.raises(BoardFileError) as exc:
        read_board_model(tmp_path)
    assert str(exc.value) == f"{tmp_path} is a directory, not a board model file"
    assert issubclass(BoardFileError, ValueError)
