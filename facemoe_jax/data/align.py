r"""Face alignment from five landmarks onto the ArcFace template (insightface's ``norm_crop``).

  python -m facemoe_jax.data.align --images DIR --landmarks CSV --out DIR [--size 112]
      [--border constant|replicate] [--format jpg|png] [--skip-missing]
      Every image under DIR (recursively) is cut to a SIZE x SIZE crop whose five landmarks (the
      CSV's row for the image's path relative to DIR) land on the template, and written to the
      same relative path under OUT (JPEG quality 95 or PNG). An image without a row in the CSV is
      an error, or with --skip-missing is listed and skipped; an unreadable image is an error.

The transform is the least-squares similarity (rotation, uniform scale, translation; never a
reflection) of Umeyama (1991), the estimate insightface's ``norm_crop`` makes, followed by a
bilinear ``cv2.warpAffine``. insightface fills outside the photo with black ("constant"); the
crops of ``realfaces/lfw/aligned112`` repeat the edge pixels ("replicate").

The landmark CSV (as ``realfaces/lfw/landmarks_deepfunneled250.csv``) has a header naming at
least ``file`` (the image path relative to the image folder, "/"-separated) and ``x0,y0 ..
x4,y4`` in the ArcFace order: the eye seen on the image's left, the other eye, the nose tip,
the mouth corner on the left, the one on the right.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

from facemoe_jax.core import messages
from facemoe_jax.data.folder import IMAGE_EXTENSIONS
from facemoe_jax.core.progress import Progress

# The five ArcFace landmarks in a 112 x 112 crop (insightface's arcface_dst).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
ARCFACE_TEMPLATE.setflags(write=False)

BORDERS = ("constant", "replicate")
FORMATS = ("jpg", "png")
JPEG_QUALITY = 95
FILE_COLUMN = "file"
LANDMARK_COLUMNS = tuple(f"{axis}{k}" for k in range(5) for axis in "xy")
SKIPPED_FILE = "skipped_no_landmarks.txt"
_SHOWN_SKIPPED = 20  # paths printed; all of them go to SKIPPED_FILE


def similarity_transform(src, dst) -> np.ndarray:
    """(2, 3) float64 matrix M of the least-squares similarity taking `src` points onto `dst`.

    Minimises sum_i |s R src_i + t - dst_i|^2 over a rotation R (det +1), a scale s > 0 and a
    translation t (Umeyama 1991): with the centred points and their covariance
    Sigma = dst_c^T src_c / n = U diag(d) V^T, R = U diag(1, det(U) det(V)) V^T (the sign keeps
    R a rotation when the best orthogonal fit would mirror), s = trace(diag(d) diag(1, sign)) /
    var(src), t = mean(dst) - s R mean(src). Then dst_i ~ M @ [x_i, y_i, 1].
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2 or src.shape != dst.shape:
        raise ValueError(
            f"similarity_transform needs two (N, 2) point arrays of one shape, N >= 2; "
            f"got {src.shape} and {dst.shape}"
        )
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("similarity_transform: the points hold NaN or infinite values")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_variance = (src_c**2).sum() / len(src)
    if src_variance <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError("similarity_transform: the source points all coincide (no scale or angle)")
    u, d, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ np.diag(signs) @ vt
    scale = float(d @ signs) / src_variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def arcface_template(image_size: int = 112) -> np.ndarray:
    """(5, 2) landmark positions in an `image_size` crop, by insightface's ``estimate_norm`` rule.

    A multiple of 112 scales the 112 template; otherwise a multiple of 128 scales it by
    size / 128 and shifts it right by 8 * size / 128 (the 112 face centred in a 128 crop).
    """
    size = int(image_size)
    if size != image_size or size <= 0:
        raise ValueError(f"image size must be a positive integer, got {image_size!r}")
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112)
    if size % 128 == 0:
        ratio = size / 128
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise ValueError(f"image size must be a multiple of 112 or 128 (the template's), got {size}")


def norm_crop(
    image: np.ndarray, landmarks, image_size: int = 112, border: str = "constant"
) -> np.ndarray:
    """The `image_size` square uint8 crop with `landmarks` ((5, 2), x then y) on the template.

    `image` is uint8 (H, W) or (H, W, C), any channel order (it is kept). `border` fills what
    lies outside the photo: "constant" with 0 (insightface), "replicate" with the edge pixels.
    """
    import cv2

    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"norm_crop needs a uint8 (H, W) or (H, W, C) image, got {image.dtype} {image.shape}"
        )
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"norm_crop needs (5, 2) landmarks, got shape {landmarks.shape}")
    matrix = similarity_transform(landmarks, arcface_template(image_size))
    size = int(image_size)
    mode = cv2.BORDER_CONSTANT if border == "constant" else cv2.BORDER_REPLICATE
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=mode, borderValue=0
    )


def read_landmarks_csv(path: str) -> dict[str, np.ndarray]:
    """{image path relative to the image folder: (5, 2) float64 landmarks} from a landmark CSV.

    Every problem is a ValueError naming the file and the line (and field): a missing column,
    a row with another number of fields than the header, a value that is not a finite number,
    an image listed twice.
    """
    landmarks: dict[str, np.ndarray] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected a header naming file,x0,y0..x4,y4)")
        missing = [name for name in (FILE_COLUMN, *LANDMARK_COLUMNS) if name not in header]
        if missing:
            raise ValueError(f"{path}, line 1: the header lacks the columns {','.join(missing)}")
        file_index = header.index(FILE_COLUMN)
        value_indices = [header.index(name) for name in LANDMARK_COLUMNS]
        for row in reader:
            line = reader.line_num
            if not row:
                continue  # a blank line (a trailing newline too many) carries no row
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {line}: {len(row)} fields where the header has {len(header)}"
                )
            values = []
            for name, k in zip(LANDMARK_COLUMNS, value_indices):
                try:
                    value = float(row[k])
                except ValueError:
                    value = float("nan")
                if not np.isfinite(value):
                    raise ValueError(
                        f"{path}, line {line}, field {name}: {row[k]!r} is not a finite number"
                    )
                values.append(value)
            name = row[file_index]
            if not name:
                raise ValueError(f"{path}, line {line}, field {FILE_COLUMN}: empty")
            if name in landmarks:
                raise ValueError(f"{path}, line {line}: {name} is listed a second time")
            landmarks[name] = np.array(values).reshape(5, 2)
    return landmarks


def list_images(root: str) -> list[str]:
    """The image files under `root`, recursively, as sorted "/"-separated relative paths."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        relative = os.path.relpath(folder, root)
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = name if relative == "." else os.path.join(relative, name)
                found.append(path.replace(os.sep, "/"))
    return sorted(found)


def _read_image(path: str) -> np.ndarray:
    import cv2

    with open(path, "rb") as f:
        data = f.read()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"unreadable image {path} (not a decodable image file)")
    return image


def _write_image(path: str, image: np.ndarray, image_format: str) -> None:
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if image_format == "jpg" else []
    ok, encoded = cv2.imencode(f".{image_format}", image, params)
    if not ok:
        raise ValueError(f"could not encode {path} as {image_format}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(encoded.tobytes())


def align_folder(
    images_dir: str,
    landmarks_csv: str,
    out_dir: str,
    image_size: int = 112,
    border: str = "constant",
    image_format: str = "jpg",
    skip_missing: bool = False,
) -> tuple[int, list[str]]:
    """Aligns every image under `images_dir`; returns (images written, paths skipped).

    Everything is checked before the first image is written: the CSV, a row for each image
    (else a ValueError naming the first image without one and the CSV, unless `skip_missing`),
    and that no two inputs map to one output (a.jpg and a.png both become a.<format>).
    """
    if image_format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {image_format!r}")
    arcface_template(image_size)  # a bad size fails here, before any work
    images_root, out_root = os.path.realpath(images_dir), os.path.realpath(out_dir)
    if os.path.commonpath([images_root, out_root]) == images_root:
        # A second run would find the first run's crops among its inputs.
        raise ValueError(f"output folder {out_dir} lies inside the image folder {images_dir}")
    paths = list_images(images_dir)
    if not paths:
        raise ValueError(f"no images {IMAGE_EXTENSIONS} under {images_dir}")
    landmarks = read_landmarks_csv(landmarks_csv)
    missing = [path for path in paths if path not in landmarks]
    if missing and not skip_missing:
        more = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
        raise ValueError(
            f"no landmarks for {os.path.join(images_dir, missing[0])} in {landmarks_csv}{more}; "
            f"--skip-missing leaves such images out"
        )
    todo = [path for path in paths if path in landmarks]
    outputs = [os.path.splitext(path)[0] + "." + image_format for path in todo]
    seen: dict[str, str] = {}
    for path, output in zip(todo, outputs):
        if output in seen:
            raise ValueError(
                f"{seen[output]} and {path} under {images_dir} would both be written to "
                f"{os.path.join(out_dir, output)}"
            )
        seen[output] = path
    os.makedirs(out_dir, exist_ok=True)
    skipped_path = os.path.join(out_dir, SKIPPED_FILE)
    if missing:
        with open(skipped_path, "w") as f:
            f.writelines(f"{path}\n" for path in missing)
        print(
            f"skipped {len(missing)} images without landmarks in {landmarks_csv} "
            f"(all listed in {skipped_path}):",
            flush=True,
        )
        for path in missing[:_SHOWN_SKIPPED]:
            print(f"  skipped {os.path.join(images_dir, path)}", flush=True)
        if len(missing) > _SHOWN_SKIPPED:
            print(f"  ... and {len(missing) - _SHOWN_SKIPPED} more", flush=True)
    elif os.path.exists(skipped_path):
        os.remove(skipped_path)  # from an earlier run into the same output folder
    with Progress("align", len(todo)) as progress:
        for path, output in zip(todo, outputs):
            image = _read_image(os.path.join(images_dir, path))
            crop = norm_crop(image, landmarks[path], image_size, border)
            _write_image(os.path.join(out_dir, output), crop, image_format)
            progress.update()
    return len(todo), missing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of photos (searched recursively)")
    parser.add_argument(
        "--landmarks", required=True, help="CSV with file,x0,y0..x4,y4 (paths relative to --images)"
    )
    parser.add_argument("--out", required=True, help="output folder (same relative paths)")
    parser.add_argument(
        "--size", type=int, default=112, help="crop side, a multiple of 112 or 128 (default 112)"
    )
    parser.add_argument(
        "--border",
        choices=BORDERS,
        default="constant",
        help="outside the photo: 0 (insightface's choice) or the edge pixels repeated",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="jpg", help=f"jpg (quality {JPEG_QUALITY}) or png"
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out (and list) images without a row in the CSV instead of stopping",
    )
    args = parser.parse_args(argv)
    try:
        written, skipped = align_folder(
            args.images,
            args.landmarks,
            args.out,
            args.size,
            args.border,
            args.format,
            args.skip_missing,
        )
    except (ValueError, OSError) as e:
        messages.error(e)
        sys.exit(2)
    print(f"aligned {written} images into {args.out} ({len(skipped)} skipped without landmarks)")


if __name__ == "__main__":
    main()
