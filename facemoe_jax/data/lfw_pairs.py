"""LFW's pairs files and aligned image folder (Huang et al. 2007), and packing a pairs file as
an insightface verification `.bin` (`python -m facemoe_jax.data.pack --pairs`). The protocol
the pairs define and its evaluation are evaluate/lfw.py's.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import cv2
import numpy as np

from facemoe_jax.core.progress import Progress
from facemoe_jax.data.bin_file import write_bin_raw

ALIGNED_FOLDER = "aligned112"


class PairsList(NamedTuple):
    """The pairs of one pairs file, in file order."""

    pairs: list[tuple[str, str]]  # image paths relative to the aligned folder
    issame: np.ndarray  # (N,) bool
    folds: np.ndarray  # (N,) int: the file's set of each pair (View 1: all 0)


def image_path(name: str, number: int) -> str:
    """LFW's file name of a person's image number (1-based): 'Name/Name_0001.jpg'."""
    return f"{name}/{name}_{number:04d}.jpg"


def _image_number(token: str, where: str) -> int:
    if not token.isdigit() or int(token) < 1:
        raise ValueError(f"{where}: image number {token!r} is not a positive integer")
    return int(token)


def read_pairs(path: str) -> PairsList:
    """Reads pairs.txt (View 2) or pairsDevTrain/pairsDevTest.txt (View 1).

    Header: ``SETS PAIRS`` (pairs.txt: ``10 300``) or ``PAIRS`` (one set); then each set's PAIRS
    same-person lines ``name i j`` followed by its PAIRS different-person lines
    ``name1 i name2 j`` (tab- or space-separated; blank lines ignored).

    Raises:
      ValueError: naming the file and line of the first malformed line.
    """
    try:
        with open(path) as f:
            lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the pairs file {path}: {e}") from None
    if not lines:
        raise ValueError(f"{path}: empty pairs file (expected a header such as '10 300')")
    header_line, header = lines[0]
    if not (1 <= len(header) <= 2 and all(t.isdigit() and int(t) > 0 for t in header)):
        raise ValueError(
            f"{path}, line {header_line}: expected the header 'SETS PAIRS' (pairs.txt: '10 300') "
            f"or 'PAIRS' (pairsDevTest.txt: '500'), got {' '.join(header)!r}"
        )
    num_sets, per_class = (1, int(header[0])) if len(header) == 1 else map(int, header)
    expected = num_sets * 2 * per_class
    layout = f"{num_sets} set(s) of {per_class} same + {per_class} different pairs"
    pairs, issame = [], []
    for k, (n, tokens) in enumerate(lines[1:]):
        where = f"{path}, line {n}"
        if k == expected:
            raise ValueError(f"{where}: more pairs than the header announces ({layout})")
        set_index, position = divmod(k, 2 * per_class)
        same = position < per_class
        kind = "same-person 'name i j'" if same else "different-person 'name1 i name2 j'"
        if len(tokens) != (3 if same else 4):
            raise ValueError(
                f"{where}: expected a {kind} line (set {set_index + 1}: {per_class} same-person "
                f"then {per_class} different-person lines), got {' '.join(tokens)!r}"
            )
        # A same-person line 'name i j' is 'name i name j'.
        name1, i, name2, j = (tokens[0], tokens[1], tokens[0], tokens[2]) if same else tokens
        pairs.append(
            (image_path(name1, _image_number(i, where)), image_path(name2, _image_number(j, where)))
        )
        issame.append(same)
    if len(pairs) < expected:
        raise ValueError(
            f"{path}: {len(pairs)} pair lines, the header announces {expected} ({layout})"
        )
    folds = np.arange(len(pairs)) // (2 * per_class)
    return PairsList(pairs, np.array(issame, bool), folds)


def lfw_folders(lfw_dir: str) -> tuple[str, str]:
    """(aligned image folder, LFW root) of the LFW root or of the aligned folder itself."""
    if not os.path.isdir(lfw_dir):
        raise ValueError(f"LFW folder {lfw_dir!r} is not a directory")
    aligned = os.path.join(lfw_dir, ALIGNED_FOLDER)
    if os.path.isdir(aligned):
        return aligned, lfw_dir
    return lfw_dir, os.path.dirname(os.path.abspath(lfw_dir))


def find_pairs_file(root: str, pairs_file: str) -> str:
    """The pairs file: an absolute path, or one relative to the LFW root (else to the cwd)."""
    if os.path.isabs(pairs_file):
        candidates = [pairs_file]
    else:
        candidates = [os.path.join(root, pairs_file), pairs_file]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(f"pairs file {pairs_file!r} not found (looked for {' and '.join(candidates)})")


def write_pairs_bin(pairs_file: str, images_dir: str, out_path: str) -> int:
    """Packs the pairs of an LFW pairs file as an insightface verification `.bin` (images img1,
    img2 of each pair in file order, their bytes as they are); returns the number of pairs.

    Every image must exist and decode (a pair is never dropped: that would shift the folds).
    The `.bin` protocol's 10 contiguous folds are pairs.txt's 10 sets. images_dir: the aligned
    folder or the LFW folder holding aligned112/; pairs_file: absolute, relative to the LFW
    folder or to the working directory."""
    images_dir, root = lfw_folders(images_dir)
    pairs_file = find_pairs_file(root, pairs_file)
    pairs_list = read_pairs(pairs_file)
    encoded = {}
    with Progress("pack pairs", 2 * len(pairs_list.pairs)) as progress:
        for pair in pairs_list.pairs:
            for path in pair:
                if path not in encoded:
                    full = os.path.join(images_dir, path)
                    if not os.path.isfile(full):
                        raise ValueError(
                            f"image {full} of the pairs file {pairs_file} does not exist"
                        )
                    with open(full, "rb") as f:
                        data = f.read()
                    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
                        raise ValueError(f"image {full} is not a decodable JPEG/PNG")
                    encoded[path] = data
                progress.update()
    write_bin_raw(
        out_path, [encoded[p] for pair in pairs_list.pairs for p in pair], pairs_list.issame
    )
    return len(pairs_list.pairs)
