"""Hugging Face checkpoint directories of the reference implementation (``hgrn_bit``).

A checkpoint is ``config.json`` plus ``model.safetensors`` or several shards listed in
``model.safetensors.index.json``; tensors are float32, float16 or bfloat16. Everything is
returned as float32 NumPy arrays under the tensor names of MODEL.md.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .config import ConfigError, ModelConfig

__all__ = ["CheckpointError", "tensor_shapes", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or tensors, or holds the wrong shapes."""


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the network needs, with its shape (MODEL.md, 'Checkpoint format')."""
    d, I, V, L = cfg.d, cfg.intermediate_size, cfg.vocab_size, cfg.n_layers
    shapes: dict[str, tuple[int, ...]] = {
        "model.embeddings.weight": (V, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (V, d),
        "lm_head.norm.weight": (d,),
    }
    if cfg.use_lower_bound:
        shapes["model.lower_bounds"] = (L, d)
    for l in range(L):
        p = f"model.layers.{l}."
        shapes[p + "attn_norm.weight"] = (d,)
        for proj in "ifgo":
            shapes[p + f"attn.{proj}_proj.weight"] = (d, d)
            shapes[p + f"attn.{proj}_proj.norm.weight"] = (d,)
        shapes[p + "attn.g_norm.weight"] = (d,)
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (2 * I, d)
        shapes[p + "mlp.gate_proj.norm.weight"] = (d,)
        shapes[p + "mlp.down_proj.weight"] = (d, I)
        shapes[p + "mlp.down_proj.norm.weight"] = (I,)
    return shapes


# safetensors: 8-byte little-endian header length, JSON header, then raw little-endian data.
# Read directly so that bfloat16 (which NumPy lacks) widens exactly to float32.
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
           "BF16": np.dtype("<u2")}


def _read_safetensors(path: Path, wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if len(blob) < 8:
        raise CheckpointError(f"{path} is too short to be a safetensors file")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if 8 + hlen > len(blob):
        raise CheckpointError(f"{path} is truncated: its header runs past the end of the file")
    try:
        header = json.loads(blob[8:8 + hlen])
    except ValueError:
        raise CheckpointError(f"{path} has a corrupt safetensors header") from None
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or (wanted is not None and name not in wanted):
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get('dtype')}; "
                                  "only F32, F16, BF16 and F64 are supported")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + end > len(blob) or end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path} is truncated or corrupt at tensor {name}")
        raw = np.frombuffer(blob, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        if info["dtype"] == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32)
        out[name] = arr.reshape(shape)
    return out


def load_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Load config and all tensors (float32) of a checkpoint directory, checking names and shapes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a checkpoint directory")
    try:
        cfg = ModelConfig.from_json(directory / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    shapes = tensor_shapes(cfg)
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    tensors: dict[str, np.ndarray] = {}
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, set()).add(name)
        for fname, names in sorted(by_file.items()):
            tensors.update(_read_safetensors(directory / fname, names))
    elif single.exists():
        tensors = _read_safetensors(single)
    else:
        raise CheckpointError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")
    for name, shape in shapes.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint {directory} lacks tensor {name}")
        if tensors[name].shape != shape:
            raise CheckpointError(f"checkpoint tensor {name} has shape {list(tensors[name].shape)}, "
                                  f"config.json implies {list(shape)}")
    return cfg, {name: tensors[name] for name in shapes}


def save_checkpoint(directory: str | Path, cfg: ModelConfig, tensors: dict[str, np.ndarray],
                    dtype: str = "float32", shard_bytes: int | None = None) -> Path:
    """Write a checkpoint directory the reference implementation can load.

    ``dtype`` is float32, float16 or bfloat16 (rounded to nearest even); with ``shard_bytes``
    the tensors are split over several files with an index, as large checkpoints are.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    missing = set(shapes) - set(tensors)
    if missing:
        raise CheckpointError(f"cannot save: tensors missing: {', '.join(sorted(missing))}")

    def encode(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if dtype == "float32":
            return a
        if dtype == "float16":
            return a.astype(np.float16)
        if dtype == "bfloat16":
            bits = a.view(np.uint32)
            rounded = bits + 0x7FFF + ((bits >> 16) & 1)      # round to nearest even
            return (rounded >> 16).astype(np.uint16)
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")

    encoded = {name: encode(tensors[name]) for name in shapes}
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")

    def write(path: Path, group: dict[str, np.ndarray]):
        save_file(group, str(path), metadata={"format": "pt"})
        if dtype == "bfloat16":   # safetensors.numpy has no bfloat16: relabel the uint16 payloads
            blob = bytearray(path.read_bytes())
            (hlen,) = struct.unpack("<Q", blob[:8])
            header = json.loads(blob[8:8 + hlen])
            for name in group:
                header[name]["dtype"] = "BF16"
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)         # keep the data 8-byte aligned
            path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(blob[8 + hlen:]))

    if shard_bytes is None:
        write(directory / "model.safetensors", encoded)
        return directory
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in encoded.items():
        if shards[-1] and size + arr.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write(directory / fname, group)
        weight_map.update({name: fname for name in group})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    return directory
