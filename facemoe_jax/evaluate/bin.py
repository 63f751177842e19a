"""insightface verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): read and write.

The container (a pickle of encoded images and issame flags, loaded without running code) is
data/bin_file.py's; here its images are decoded for evaluation, and arrays encoded into one.

Writing: `write_bin` encodes images losslessly as PNG by default, so a set written from arrays
decodes to exactly those arrays (JPEG, the format of the public files, is lossy). The command

  python -m facemoe_jax.evaluate.bin --write-synthetic OUT.bin --pairs 1000 --image-size 48

writes the held-out synthetic pairs the train loop evaluates (`data.synthetic.verification_pairs`).
"""

from __future__ import annotations

import argparse
import os

import cv2
import numpy as np

from facemoe_jax.data.bin_file import read_bin_raw, write_bin_raw


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
