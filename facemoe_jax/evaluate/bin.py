"""insightface verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): read and write.

A `.bin` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2N encoded images (JPEG or PNG
bytes, or numpy uint8 arrays of those bytes), pair i is ``(bins[2i], bins[2i+1])``, and
``issame_list`` holds N booleans. Most files were written by Python 2, so strings are loaded as
bytes (``encoding="bytes"``).

A pickle can run any callable it names, so a `.bin` is loaded with `SafeUnpickler`, which resolves
only the few globals these files need (numpy array reconstruction and ``_codecs.encode``, which
Python 3 uses for bytes in protocol-2 pickles) and refuses everything else.

Writing: `write_bin` encodes images losslessly as PNG by default, so a set written from arrays
decodes to exactly those arrays (JPEG, the format of the public files, is lossy); `write_bin_raw`
writes encoded bytes as they are (`python -m facemoe_jax.data.pack --pairs` packs LFW's pairs
files this way). The command

  python -m facemoe_jax.evaluate.bin --write-synthetic OUT.bin --pairs 1000 --image-size 48

writes the held-out synthetic pairs the train loop evaluates (`data.synthetic.verification_pairs`).
"""

from __future__ import annotations

import argparse
import codecs
import io
import os
import pickle

import cv2
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


def decode_image(data: bytes, image_size: int | None = None) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> uint8 (S, S, 3) RGB, resized to image_size when given.

    As FaceMoE's HQ script (validation_hq/validate_hq.py) and insightface's verification loader:
    decode with OpenCV to RGB (``mx.image.imdecode``), and when the width differs from the model
    input, resize with OpenCV bicubic (``mx.image.resize_short``'s default ``interp=2``), up or
    down; the 112 px faces go to 120 px this way. Flipping and (x/255 - 0.5)/0.5 follow in the
    embedder.
    """
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable image")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
    return image


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


def load_bin(path: str, image_size: int | None = None):
    """Reads a verification `.bin`.

    Returns:
      images_a, images_b: uint8 (N, S, S, 3) RGB (first and second image of each pair),
      issame: bool (N,).
    """
    bins, issame = read_bin_raw(path)
    images = []
    for i, data in enumerate(bins):
        try:
            images.append(decode_image(data, image_size))
        except ValueError:
            raise ValueError(f"{path}: bins[{i}] is not a decodable JPEG/PNG image") from None
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise ValueError(f"{path}: images of different sizes {sorted(sizes)}; pass image_size")
    images = np.stack(images)
    return images[0::2], images[1::2], issame


def encode_image(image: np.ndarray, extension: str = ".png") -> bytes:
    """uint8 (H, W, 3) RGB -> encoded bytes (".png" lossless, ".jpg" quality 95)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if extension == ".jpg" else []
    ok, buffer = cv2.imencode(extension, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as {extension}")
    return buffer.tobytes()


def write_bin(
    path: str, images_a: np.ndarray, images_b: np.ndarray, issame, extension: str = ".png"
) -> None:
    """Writes pairs as an insightface `.bin` (pickle protocol 2, as the public files)."""
    if len(images_a) != len(images_b) or len(images_a) != len(issame):
        raise ValueError(
            f"images_a, images_b and issame differ in length: "
            f"{len(images_a)}, {len(images_b)}, {len(issame)}"
        )
    bins = []
    for a, b in zip(images_a, images_b):
        bins += [encode_image(a, extension), encode_image(b, extension)]
    write_bin_raw(path, bins, issame)


def write_bin_raw(path: str, bins: list[bytes], issame) -> None:
    """Writes already encoded images (2N bytes objects, pair i = bins[2i], bins[2i+1]) and
    issame (N,) as an insightface `.bin`, the bytes as they are (the mirror of read_bin_raw)."""
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in bins], [bool(s) for s in issame]), f, protocol=2)


def write_synthetic_bin(path: str, num_pairs: int, image_size: int, seed: int) -> None:
    """The held-out synthetic pairs of the end-of-training evaluation, as a lossless `.bin`."""
    from facemoe_jax.data import synthetic

    images_a, images_b, issame = synthetic.verification_pairs(
        num_pairs=num_pairs, image_size=image_size, seed=seed
    )
    write_bin(path, images_a, images_b, issame, extension=".png")


def list_bin_sets(bin_dir: str, names: str) -> list[tuple[str, str | None]]:
    """[(name, path or None when missing)] for config.eval.bin_dir / bin_sets.

    names: comma-separated set names ("lfw,cfp_fp"); empty = every `.bin` in the folder.
    A folder that does not exist is an error; a named set without its file maps to None.
    """
    if not os.path.isdir(bin_dir):
        raise ValueError(f"config.eval.bin_dir={bin_dir!r} is not a directory")
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        wanted = sorted(f[:-4] for f in os.listdir(bin_dir) if f.endswith(".bin"))
    out = []
    for name in wanted:
        path = os.path.join(bin_dir, name if name.endswith(".bin") else f"{name}.bin")
        out.append((name.removesuffix(".bin"), path if os.path.isfile(path) else None))
    return out


def _main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-synthetic", metavar="OUT.bin", required=True)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_synthetic_bin(args.write_synthetic, args.pairs, args.image_size, args.seed)
    print(f"wrote {args.pairs} pairs of {args.image_size} px to {args.write_synthetic}")


if __name__ == "__main__":
    _main()
