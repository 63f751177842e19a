"""A validation split of a training people list: held-out people, and pairs among them.

Settings (learning rates, loss weights, sizes) are chosen on people the model never trained on
and the test never uses: a seeded share of the training people with two or more images is held
out, the rest stay for training, and verification pairs are drawn among the held-out people in
LFW's View 2 layout (`evaluate/lfw.py` reads them as a k-fold protocol: each fold's threshold
from the other folds). The people of a fold are in no other fold, as in LFW's own folds.

  train_people.txt   one name per line: the people left for training (a people file);
  pairs.txt          "FOLDS PAIRS", then per fold PAIRS same-person lines `name i j` and PAIRS
                     different-person lines `name1 i name2 j` (LFW's image numbers).
"""

from __future__ import annotations

import os
import re

import numpy as np

_NUMBER = re.compile(r"_(\d{4})\.[A-Za-z]+$")


def image_numbers(images_dir: str, name: str) -> list[int]:
    """The LFW image numbers (`Name_0003.jpg` -> 3) of one person's folder, sorted."""
    folder = os.path.join(images_dir, name)
    if not os.path.isdir(folder):
        raise ValueError(f"person {name!r} has no folder in {images_dir}")
    numbers = sorted(
        int(m.group(1)) for f in os.listdir(folder) if (m := _NUMBER.search(f)) is not None
    )
    if not numbers:
        raise ValueError(f"{folder} holds no LFW-named image (Name_NNNN.jpg)")
    return numbers


def split_people(images: dict[str, list[int]], share: float, seed: int):
    """(training names, held-out names): `share` of the people with two or more images, drawn
    with `seed`, are held out; names keep the order of `images`."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"validation share={share} must be in (0, 1)")
    candidates = sorted(name for name, numbers in images.items() if len(numbers) >= 2)
    count = round(share * len(candidates))
    if count < 4:
        raise ValueError(
            f"validation share={share} of {len(candidates)} people with two or more images "
            f"holds out {count}; at least 4 are needed for pairs"
        )
    held = set(np.random.default_rng(seed).choice(candidates, count, replace=False).tolist())
    return [n for n in images if n not in held], [n for n in images if n in held]


def fold_pairs(images: dict[str, list[int]], people: list[str], per_class: int, rng):
    """`per_class` same-person pairs (distinct image pairs, persons drawn uniformly so that no
    one person fills the fold) and `per_class` different-person pairs among `people`."""
    same, seen = [], set()
    owners = [p for p in people if len(images[p]) >= 2]
    possible = sum(len(images[p]) * (len(images[p]) - 1) // 2 for p in owners)
    if possible < per_class or len(people) < 2:
        raise ValueError(
            f"{len(people)} people with {possible} same-person image pairs cannot give "
            f"{per_class} same-person pairs: lower the pairs per fold or raise the share"
        )
    while len(same) < per_class:
        person = owners[rng.integers(len(owners))]
        i, j = sorted(rng.choice(images[person], 2, replace=False).tolist())
        if (person, i, j) not in seen:
            seen.add((person, i, j))
            same.append(f"{person}\t{i}\t{j}")
    different, seen = [], set()
    while len(different) < per_class:
        a, b = rng.choice(len(people), 2, replace=False)
        pa, pb = people[a], people[b]
        i, j = int(rng.choice(images[pa])), int(rng.choice(images[pb]))
        if (pa, i, pb, j) not in seen:
            seen.add((pa, i, pb, j))
            different.append(f"{pa}\t{i}\t{pb}\t{j}")
    return same + different


def write_split(
    images_dir: str,
    people: list[str],
    out_dir: str,
    share: float = 0.1,
    folds: int = 10,
    per_class: int = 40,
    seed: int = 0,
) -> tuple[str, str]:
    """Writes out_dir/train_people.txt and out_dir/pairs.txt (see the module doc) for the
    people list `people` of the aligned folder `images_dir`; returns their paths. The same
    arguments always write the same files."""
    images = {name: image_numbers(images_dir, name) for name in people}
    train, held = split_people(images, share, seed)
    if len(held) < 2 * folds:
        raise ValueError(f"{len(held)} held-out people cannot fill {folds} folds of two or more")
    rng = np.random.default_rng([seed, 0x5A11D])
    order = rng.permutation(held).tolist()
    lines = [f"{folds}\t{per_class}"]
    for fold in range(folds):
        lines += fold_pairs(images, order[fold::folds], per_class, rng)
    os.makedirs(out_dir, exist_ok=True)
    people_path = os.path.join(out_dir, "train_people.txt")
    pairs_path = os.path.join(out_dir, "pairs.txt")
    for path, text in ((people_path, train), (pairs_path, lines)):
        partial = f"{path}.tmp"
        with open(partial, "w") as f:
            f.write("\n".join(text) + "\n")
        os.replace(partial, path)
    return people_path, pairs_path
