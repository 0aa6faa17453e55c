"""Board model files (``.mmf``): a quantized model as the host uploads it to a board.

Layout (all little-endian)::

    offset  size  field
    0       8     magic  b"MMFBOARD"
    8       4     format version (uint32), currently 1
    12      8     payload length in bytes (uint64)
    20      4     CRC-32 (IEEE 802.3, zlib.crc32) of the payload
    24      ...   payload: a safetensors blob (no pickle: a JSON header and raw arrays)

The payload's ``__metadata__["mmfree"]`` is a JSON object with the configuration and every
scalar of :mod:`~mmfree.models.quantized`; its tensors are::

    embed.q               int8   [V, d]       embed.scale   uint16 [V]
    sigmoid_lut           uint16 [256]
    <norm>.w              int16  [n]          for layers.{l}.{attn_norm,g_norm,mlp_norm}, final_norm
    <bitlinear>.g         int16  [in]         for layers.{l}.{i,f,g,o,gate,down}_proj, lm_head
    <bitlinear>.trits     uint8  [groups, in, lanes/4]
    layers.{l}.lower_bound uint16 [d]         for l >= 1 when the model uses lower bounds

Trits are packed as the ternary core reads them: output rows in groups of ``lanes`` (the last
group padded with zero rows); per group and input column one word of ``lanes`` trits, lane k
in bits 2k+1..2k, 2-bit codes 00 = 0, 01 = +1, 11 = -1 (10 is invalid).

:func:`read_board_model` checks magic, version, length, CRC, names, dtypes, shapes and value
ranges, and raises :class:`BoardFileError` with one sentence naming the first problem.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from . import arith
from .config import ConfigError, ModelConfig
from .quantized import BitLinearParams, LayerParams, NormParams, QuantizedModel

__all__ = ["MAGIC", "FORMAT_VERSION", "BoardFileError", "pack_trits", "unpack_trits",
           "board_model_bytes", "write_board_model", "read_board_model", "parse_board_model"]

MAGIC = b"MMFBOARD"
FORMAT_VERSION = 1
_ENVELOPE = struct.Struct("<8sIQI")
TRIT_CODES = {0: 0b00, 1: 0b01, -1: 0b11}


class BoardFileError(ValueError):
    """A board model file that cannot be used; the message names the problem."""


# --------------------------------------------------------------------------- trit packing

def pack_trits(trits: np.ndarray, lanes: int) -> np.ndarray:
    """int8 T [rows, n] in {-1, 0, 1} → uint8 [groups, n, lanes/4] in the core's read order."""
    t = np.asarray(trits)
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("trits must be -1, 0 or +1")
    rows, n = t.shape
    groups = -(-rows // lanes)
    padded = np.zeros((groups * lanes, n), dtype=np.int8)
    padded[:rows] = t
    codes = (padded.astype(np.uint8) & 0b11).reshape(groups, lanes, n).transpose(0, 2, 1)
    codes = codes.reshape(groups, n, lanes // 4, 4)
    return (codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)).astype(np.uint8)


def unpack_trits(packed: np.ndarray, rows: int) -> np.ndarray:
    """Inverse of :func:`pack_trits`; raises ValueError on the invalid code 10 or on non-zero
    padding rows."""
    packed = np.asarray(packed, dtype=np.uint8)
    groups, n, quads = packed.shape
    codes = np.stack([(packed >> (2 * i)) & 0b11 for i in range(4)], axis=-1)   # [g, n, q, 4]
    if np.any(codes == 0b10):
        raise ValueError("holds the invalid trit code 0b10")
    codes = codes.reshape(groups, n, quads * 4).transpose(0, 2, 1).reshape(groups * quads * 4, n)
    trits = np.where(codes == 0b11, -1, codes.astype(np.int8)).astype(np.int8)
    if np.any(trits[rows:]):
        raise ValueError("has non-zero trits in the padding rows")
    return trits[:rows]


# --------------------------------------------------------------------------- writing

def _metadata(qm: QuantizedModel) -> dict:
    cfg = qm.cfg
    return {
        "format": "mmfree-board",
        "arith_version": arith.ARITH_VERSION,
        "name": qm.name,
        "source": qm.source,
        "config": {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d,
                   "num_hidden_layers": cfg.n_layers, "intermediate_size": cfg.intermediate_size,
                   "rms_norm_eps": cfg.rms_norm_eps, "use_lower_bound": cfg.use_lower_bound},
        "lanes": qm.lanes,
        "res_fracs": list(qm.res_fracs),
        "emb_shift": qm.emb_shift,
        "layers": [{"o_frac": layer.o_frac, "u_frac": layer.u_frac} for layer in qm.layers],
        "norms": {name: {"w_frac": p.w_frac, "out_frac": p.out_frac, "eps_q": p.eps_q}
                  for name, p in qm.norms()},
        "bitlinears": {name: {"g_frac": p.g_frac, "gamma": p.gamma, "gamma_mant": p.gamma_mant,
                              "gamma_exp": p.gamma_exp, "out_frac": p.out_frac, "eps_q": p.eps_q,
                              "rows": int(p.trits.shape[0])}
                       for name, p in qm.bitlinears()},
        "meta": qm.meta,
    }


def board_model_bytes(qm: QuantizedModel) -> bytes:
    """The complete file contents for ``qm``."""
    from safetensors.numpy import save

    tensors = {"embed.q": qm.emb_q.astype(np.int8), "embed.scale": qm.emb_scale.astype(np.uint16),
               "sigmoid_lut": np.asarray(qm.sig_lut, dtype=np.uint16)}
    for name, p in qm.norms():
        tensors[f"{name}.w"] = p.w_q.astype(np.int16)
    for name, p in qm.bitlinears():
        tensors[f"{name}.g"] = p.g_q.astype(np.int16)
        tensors[f"{name}.trits"] = pack_trits(p.trits, qm.lanes)
    for l, layer in enumerate(qm.layers):
        if layer.lower_bound is not None:
            tensors[f"layers.{l}.lower_bound"] = layer.lower_bound.astype(np.uint16)
    payload = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                   metadata={"mmfree": json.dumps(_metadata(qm), sort_keys=True)})
    return _ENVELOPE.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload


def write_board_model(qm: QuantizedModel, path: str | Path) -> Path:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    data = board_model_bytes(qm)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- reading

def read_board_model(path: str | Path) -> QuantizedModel:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BoardFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise BoardFileError(f"{path} is a directory, not a board model file") from None
    except OSError as exc:
        raise BoardFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_board_model(data)
    except BoardFileError as exc:
        raise BoardFileError(f"{path}: {exc}") from None


def _check(cond: bool, message: str):
    if not cond:
        raise BoardFileError(message)


def parse_board_model(data: bytes) -> QuantizedModel:
    _check(data[:8] == MAGIC, "not an mmfree board model file (no MMFBOARD magic at the start)")
    _check(len(data) >= _ENVELOPE.size,
           f"file is truncated: {len(data)} bytes, less than its {_ENVELOPE.size}-byte header")
    _, version, length, crc = _ENVELOPE.unpack_from(data)
    _check(version == FORMAT_VERSION,
           f"board model file format version {version} is not supported (this mmfree reads "
           f"version {FORMAT_VERSION}); convert the checkpoint again")
    payload = data[_ENVELOPE.size:]
    _check(len(payload) >= length,
           f"file is truncated: the header announces {length} payload bytes, {len(payload)} are there")
    _check(len(payload) == length,
           f"file has {len(payload) - length} unexpected bytes after the payload")
    _check(zlib.crc32(payload) == crc, "CRC mismatch: the file is corrupted")

    try:
        (hlen,) = struct.unpack_from("<Q", payload)
        header = json.loads(payload[8:8 + hlen])
        meta = json.loads(header["__metadata__"]["mmfree"])
        from safetensors.numpy import load
        tensors = load(payload)
    except Exception as exc:            # a valid CRC over a malformed payload: a writer bug
        raise BoardFileError(f"payload is not a valid board model ({type(exc).__name__})") from None

    _check(isinstance(meta, dict) and meta.get("format") == "mmfree-board",
           "payload is not an mmfree board model")
    _check(meta.get("arith_version") == arith.ARITH_VERSION,
           f"file was made for arithmetic version {meta.get('arith_version')}, this mmfree "
           f"implements version {arith.ARITH_VERSION}; convert the checkpoint again")
    try:
        cfg = ModelConfig.from_dict(dict(_field(meta, "config", dict, "header"), model_type="hgrn_bit"))
    except ConfigError as exc:
        raise BoardFileError(str(exc)) from None
    return _build(cfg, meta, tensors)


def _field(meta: dict, key: str, kind: type, where: str):
    """``meta[key]`` checked to be a JSON value of ``kind`` (dict, list, int or float)."""
    _check(key in meta, f"{where}: metadata field {key!r} is missing (the file was made by another "
                        "version of mmfree); convert the checkpoint again")
    v = meta[key]
    ok = isinstance(v, kind) and not isinstance(v, bool)
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    _check(ok, f"{where}: metadata field {key!r} must be a JSON "
               f"{ {dict: 'object', list: 'array', int: 'integer', float: 'finite number'}[kind] }, "
               f"not {v!r}")
    return v


def _tensor(tensors, name, dtype, shape):
    _check(name in tensors, f"tensor {name} is missing")
    t = tensors[name]
    _check(t.dtype == np.dtype(dtype), f"tensor {name} has dtype {t.dtype}, expected {np.dtype(dtype)}")
    _check(t.shape == tuple(shape),
           f"tensor {name} has shape {list(t.shape)}, the configuration implies {list(shape)}")
    return t


def _int_in(meta: dict, key, lo: int, hi: int, where: str) -> int:
    _check(key in meta, f"{where}: metadata field {key!r} is missing (the file was made by another "
                        "version of mmfree); convert the checkpoint again")
    v = meta[key]
    _check(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
           f"{where}: {key} = {v!r} is outside [{lo}, {hi}]")
    return v


def _build(cfg: ModelConfig, meta: dict, tensors: dict) -> QuantizedModel:
    d, I, V = cfg.d, cfg.intermediate_size, cfg.vocab_size
    lanes = _field(meta, "lanes", int, "header")
    _check(lanes in (8, 16, 32, 64), f"lanes = {lanes!r} is not one of 8, 16, 32, 64")
    res_fracs = _field(meta, "res_fracs", list, "header")
    stages = 2 * cfg.n_layers + 1
    _check(len(res_fracs) == stages,
           f"header: res_fracs must list {stages} formats (2L+1), not {res_fracs!r}")
    for k, f in enumerate(res_fracs):
        _check(isinstance(f, int) and not isinstance(f, bool) and 0 <= f <= 14,
               f"header: res_fracs[{k}] = {f!r} is outside [0, 14]")
    _check(all(b <= a for a, b in zip(res_fracs, res_fracs[1:])),
           f"header: res_fracs {res_fracs} increase along the network")
    norms_meta = _field(meta, "norms", dict, "header")
    bitlinears_meta = _field(meta, "bitlinears", dict, "header")
    emb_shift = _int_in(meta, "emb_shift", 0, 24, "header")

    emb_q = _tensor(tensors, "embed.q", np.int8, (V, d))
    _check(int(emb_q.min(initial=0)) >= -127, "tensor embed.q holds -128, outside the int8 range [-127, 127]")
    emb_scale = _tensor(tensors, "embed.scale", np.uint16, (V,))
    lut = _tensor(tensors, "sigmoid_lut", np.uint16, (arith.SIG_LUT_SIZE,))
    # The gateware holds this table in ROM, generated by the same function: they must agree.
    _check(np.array_equal(lut, arith.sigmoid_lut()),
           f"tensor sigmoid_lut differs from the table of arithmetic version {arith.ARITH_VERSION}")

    def norm(name: str, n: int) -> NormParams:
        m = _field(norms_meta, name, dict, "norms")
        return NormParams(w_q=_tensor(tensors, f"{name}.w", np.int16, (n,)),
                          w_frac=_int_in(m, "w_frac", 0, 15, name),
                          out_frac=_int_in(m, "out_frac", 0, 15, name),
                          eps_q=_int_in(m, "eps_q", 1, 2**32 - 1, name))

    def bitlinear(name: str, rows: int, n: int, out_frac: int | None) -> BitLinearParams:
        """``out_frac``: the format the network fixes for this output, None where it is free."""
        m = _field(bitlinears_meta, name, dict, "bitlinears")
        _check(_field(m, "rows", int, name) == rows,
               f"{name}: rows = {m['rows']!r}, the configuration implies {rows}")
        packed = _tensor(tensors, f"{name}.trits", np.uint8, (-(-rows // lanes), n, lanes // 4))
        try:
            trits = unpack_trits(packed, rows)
        except ValueError as exc:
            raise BoardFileError(f"tensor {name}.trits {exc}") from None
        p = BitLinearParams(g_q=_tensor(tensors, f"{name}.g", np.int16, (n,)),
                            g_frac=_int_in(m, "g_frac", 0, 24, name), trits=trits,
                            gamma=float(_field(m, "gamma", float, name)),
                            gamma_mant=_int_in(m, "gamma_mant", 1 << 15, (1 << 16) - 1, name),
                            gamma_exp=_int_in(m, "gamma_exp", -64, 96, name),
                            out_frac=_int_in(m, "out_frac", *((0, 15) if out_frac is None else (out_frac, out_frac)), name),
                            eps_q=_int_in(m, "eps_q", 1, 2**32 - 1, name))
        _check(p.gamma > 0, f"{name}: gamma must be positive, not {p.gamma}")
        return p

    layer_meta = _field(meta, "layers", list, "header")
    _check(len(layer_meta) == cfg.n_layers and all(isinstance(m, dict) for m in layer_meta),
           f"header: layers must list {cfg.n_layers} objects of layer formats, not {layer_meta!r}")
    layers = []
    for l in range(cfg.n_layers):
        pre = f"layers.{l}."
        o_frac = _int_in(layer_meta[l], "o_frac", 0, 14, f"layers.{l}")
        u_frac = _int_in(layer_meta[l], "u_frac", 0, 14, f"layers.{l}")
        lb = None
        if cfg.use_lower_bound and l > 0:
            lb = _tensor(tensors, pre + "lower_bound", np.uint16, (d,))
            _check(int(lb.max()) <= arith.ONE_Q15, f"tensor {pre}lower_bound exceeds 32768 (1.0 in Q1.15)")
        proj = {name: bitlinear(pre + name, rows, n, frac) for name, rows, n, frac in (
            ("i_proj", d, d, arith.PRE_FRAC), ("f_proj", d, d, arith.PRE_FRAC),
            ("g_proj", d, d, None), ("o_proj", d, d, res_fracs[2 * l + 1]),
            ("gate_proj", 2 * I, d, arith.PRE_FRAC), ("down_proj", d, I, res_fracs[2 * l + 2]))}
        layers.append(LayerParams(attn_norm=norm(pre + "attn_norm", d), g_norm=norm(pre + "g_norm", d),
                                  mlp_norm=norm(pre + "mlp_norm", d), lower_bound=lb,
                                  o_frac=o_frac, u_frac=u_frac, **proj))
    qm = QuantizedModel(cfg=cfg, lanes=lanes, res_fracs=tuple(res_fracs), emb_shift=emb_shift, emb_q=emb_q,
                        emb_scale=emb_scale, sig_lut=lut, layers=layers,
                        final_norm=norm("final_norm", d),
                        lm_head=bitlinear("lm_head", V, d, arith.LOGIT_FRAC),
                        name=str(meta.get("name", "model")), source=str(meta.get("source", "")),
                        meta=dict(meta.get("meta") or {}))
    expected = set(tensors)
    known = {"embed.q", "embed.scale", "sigmoid_lut"}
    known |= {f"{n}.w" for n, _ in qm.norms()}
    known |= {f"{n}.{s}" for n, _ in qm.bitlinears() for s in ("g", "trits")}
    known |= {f"layers.{l}.lower_bound" for l, layer in enumerate(layers) if layer.lower_bound is not None}
    extra = sorted(expected - known)
    if extra:
        raise BoardFileError(f"tensor {extra[0]} is not part of a model of this configuration")
    return qm
