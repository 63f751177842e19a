"""The validation split of a training people list: who is held out, and the pairs among them."""

import os

import numpy as np
import pytest

from facemoe_jax.data import validation_split
from facemoe_jax.data.folder import read_people_file
from facemoe_jax.data.lfw_pairs import read_pairs


def _folder(root, counts):
    """root/<name>/<name>_000j.jpg (empty files: the split reads names, not pixels)."""
    for name, count in counts.items():
        os.makedirs(root / name)
        for j in range(1, count + 1):
            (root / name / f"{name}_{j:04d}.jpg").write_bytes(b"")
    return list(counts)


def test_split_holds_out_a_share_of_the_people_with_two_or_more_images():
    images = {f"P{k}": list(range(1, 2 + k % 3)) for k in range(60)}  # 1, 2 or 3 images
    train, held = validation_split.split_people(images, 0.25, seed=0)
    multi = [n for n, numbers in images.items() if len(numbers) >= 2]
    assert len(held) == round(0.25 * len(multi)) and set(held) <= set(multi)
    assert sorted(train + held) == sorted(images) and not set(train) & set(held)
    assert train == [n for n in images if n not in held]  # file order kept
    assert held == validation_split.split_people(images, 0.25, seed=0)[1]
    assert held != validation_split.split_people(images, 0.25, seed=1)[1]
    with pytest.raises(ValueError, match="share=1.5"):
        validation_split.split_people(images, 1.5, 0)
    with pytest.raises(ValueError, match="holds out 1; at least 4"):
        validation_split.split_people(images, 0.02, 0)


def test_written_pairs_are_folds_of_disjoint_held_out_people(tmp_path):
    counts = {f"P{k}": 2 + k % 4 for k in range(80)}
    counts.update({f"S{k}": 1 for k in range(10)})
    people = _folder(tmp_path / "aligned", counts)
    people_path, pairs_path = validation_split.write_split(
        str(tmp_path / "aligned"), people, str(tmp_path / "out"), share=0.5, folds=4, per_class=6
    )
    train = read_people_file(people_path)
    pairs = read_pairs(pairs_path)
    assert len(pairs.pairs) == 4 * 12 and pairs.issame.sum() == 24
    held = {path.split("/")[0] for pair in pairs.pairs for path in pair}
    assert not held & set(train) and len(train) + 40 == len(people)
    fold_people = [
        {p.split("/")[0] for i in np.flatnonzero(pairs.folds == f) for p in pairs.pairs[i]}
        for f in range(4)
    ]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not fold_people[a] & fold_people[b]
    for (x, y), same in zip(pairs.pairs, pairs.issame):
        assert (x.split("/")[0] == y.split("/")[0]) == same and x != y
        assert os.path.isfile(tmp_path / "aligned" / x)
    assert len(set(pairs.pairs)) == len(pairs.pairs)
    first = open(pairs_path).read()
    validation_split.write_split(
        str(tmp_path / "aligned"), people, str(tmp_path / "out"), share=0.5, folds=4, per_class=6
    )
    assert open(pairs_path).read() == first  # the same arguments, the same files


def test_too_few_pairs_and_missing_people_are_named(tmp_path):
    people = _folder(tmp_path / "aligned", {f"P{k}": 2 for k in range(20)})
    with pytest.raises(ValueError, match="cannot give 5 same-person pairs"):
        validation_split.write_split(
            str(tmp_path / "aligned"), people, str(tmp_path / "o"), share=0.5, folds=4, per_class=5
        )
    with pytest.raises(ValueError, match="person 'Nobody' has no folder"):
        validation_split.write_split(str(tmp_path / "aligned"), ["Nobody"], str(tmp_path / "o"))
