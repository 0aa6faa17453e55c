"""The training corpus of the shipped tiny model: Debian's fortune cookies, as bytes.

The corpus is the English text of the Debian packages ``fortunes`` and ``fortunes-min``:
the plain-text cookie files in ``/usr/share/games/fortunes/`` (cookies separated by lines
holding only ``%``). The index files (``.dat``), the UTF-8 link farm (``.u8``) and any
sub-folder (``off/``, other languages) are skipped.

The train/val split is deterministic at cookie granularity: a cookie whose
``zlib.crc32`` (of its bytes, trailing newline removed) is 0 modulo :data:`VAL_MODULUS` goes to
val (~5%), all others to train, so duplicate cookies always land in the same split. A split
is the cookies of every file (files in sorted name order, cookies in file order), each
followed by :data:`SEPARATOR`, so the stream reads like a cookie file and the model learns
where a cookie ends. Bytes are kept as they are (byte-level vocabulary of 256); the few
non-ASCII bytes are not decoded or replaced.

NumPy and the standard library only.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

__all__ = ["CORPUS_NAME", "DEFAULT_ROOT", "SEPARATOR", "VAL_MODULUS", "CorpusError",
           "corpus_files", "cookies", "load_corpus", "load_corpus_array"]

CORPUS_NAME = "debian-fortunes"
DEFAULT_ROOT = Path("/usr/share/games/fortunes")
SEPARATOR = b"\n%\n"
VAL_MODULUS = 20
_SKIP_SUFFIXES = (".dat", ".u8")


class CorpusError(ValueError):
    """The fortune cookie files are missing or unreadable."""


def _missing(root: Path) -> CorpusError:
    return CorpusError(f"no fortune cookie files found in {root}; install them with "
                       "`apt-get install fortunes fortunes-min`")


def corpus_files(root: str | Path | None = None) -> list[Path]:
    """The cookie files under ``root`` (default /usr/share/games/fortunes), sorted by name.

    Only regular files directly in ``root`` count; ``.dat``/``.u8`` files, hidden files and
    folders (``off/``) are skipped. Raises :class:`CorpusError` when there are none.
    """
    root = DEFAULT_ROOT if root is None else Path(root)
    if not root.is_dir():
        raise _missing(root)
    files = sorted((p for p in root.iterdir()
                    if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
                    and not p.name.endswith(_SKIP_SUFFIXES)),
                   key=lambda p: p.name)
    if not files:
        raise _missing(root)
    return files


def _split_cookies(text: bytes) -> list[bytes]:
    out, lines = [], []
    for line in text.split(b"\n"):
        if line.rstrip(b"\r") == b"%":
            out.append(b"\n".join(lines))
            lines = []
        else:
            lines.append(line)
    out.append(b"\n".join(lines))
    # Strip the blank lines that frame a cookie; keep inner layout (indentation, poems) as is.
    return [c.strip(b"\n") for c in out if c.strip()]


def cookies(split: str | None = None, root: str | Path | None = None) -> list[bytes]:
    """All cookies (without separator) of ``split`` ("train", "val" or None for both)."""
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    out = []
    for path in corpus_files(root):
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise CorpusError(f"cannot read {path} ({exc.strerror}); reinstall it with "
                              "`apt-get install --reinstall fortunes fortunes-min`") from None
        for cookie in _split_cookies(text):
            is_val = zlib.crc32(cookie) % VAL_MODULUS == 0
            if split is None or (split == "val") == is_val:
                out.append(cookie)
    return out


def load_corpus(split: str, root: str | Path | None = None) -> bytes:
    """The byte stream of ``split`` ("train" or "val"): every cookie followed by SEPARATOR."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return b"".join(c + SEPARATOR for c in cookies(split, root))


def load_corpus_array(split: str, root: str | Path | None = None) -> np.ndarray:
    """:func:`load_corpus` as a uint8 NumPy array (token ids of the byte-level vocabulary)."""
    return np.frombuffer(load_corpus(split, root), dtype=np.uint8).copy()
