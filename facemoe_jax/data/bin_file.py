"""The insightface verification `.bin` container: a pickle of ``(bins, issame_list)``.

``bins`` holds 2N encoded images (JPEG or PNG bytes, or numpy uint8 arrays of those bytes), pair
i is ``(bins[2i], bins[2i+1])``, and ``issame_list`` holds N booleans. Most files were written by
Python 2, so strings are loaded as bytes (``encoding="bytes"``).

A pickle can run any callable it names, so a `.bin` is loaded with `SafeUnpickler`, which resolves
only the few globals these files need (numpy array reconstruction and ``_codecs.encode``, which
Python 3 uses for bytes in protocol-2 pickles) and refuses everything else. Decoding the images
and the sets' evaluation are evaluate/bin.py's.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle

import numpy as np


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` limited to the one use of protocol-2 pickles: str -> bytes (latin1)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"_codecs.encode is allowed only for latin1 text, got {type(text).__name__}, {encoding!r}"
        )
    return codecs.encode(text, encoding, errors)


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler for `.bin` files: lists, tuples, bytes, bools, ints and numpy arrays only.

    Plain containers and scalars need no globals. Every global the stream names goes through
    ``find_class``; anything outside the allow-list raises ``pickle.UnpicklingError``.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a verification .bin holds only encoded images "
            "and booleans"
        )


def _as_bytes(entry, path: str, index: int) -> bytes:
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry)
    if isinstance(entry, np.ndarray) and entry.dtype == np.uint8 and entry.ndim == 1:
        return entry.tobytes()
    raise ValueError(
        f"{path}: bins[{index}] is {type(entry).__name__}"
        f"{getattr(entry, 'dtype', '')}, expected encoded image bytes or a 1-D uint8 array"
    )


def read_bin_raw(path: str) -> tuple[list[bytes], np.ndarray]:
    """The encoded images (2N bytes objects) and issame (N,) bool of a `.bin`, not decoded."""
    with open(path, "rb") as f:
        try:
            content = SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}") from None
        except (EOFError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a verification .bin pickle ({e})") from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame = content
    bins = [_as_bytes(b, path, i) for i, b in enumerate(bins)]
    issame = np.asarray(issame)
    if issame.ndim != 1 or issame.dtype.kind not in "bi":
        raise ValueError(f"{path}: issame_list must be a list of booleans, got {issame.dtype}")
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})"
        )
    return bins, issame.astype(bool)


def write_bin_raw(path: str, bins: list[bytes], issame) -> None:
    """Writes already encoded images (2N bytes objects, pair i = bins[2i], bins[2i+1]) and
    issame (N,) as an insightface `.bin`, the bytes as they are (the mirror of read_bin_raw)."""
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in bins], [bool(s) for s in issame]), f, protocol=2)
