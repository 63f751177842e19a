r"""LFW (Labeled Faces in the Wild) verification from the aligned image folder and its pairs files.

The two protocols of the LFW pairs files (Huang et al. 2007), chosen by the file's header:

* View 2, ``pairs.txt`` (header ``10 300``): 10 sets, each 300 same-person lines ``name i j``
  then 300 different-person lines ``name1 i name2 j``. 10-fold accuracy: each set is a fold, its
  threshold chosen on the other nine (`verification.ten_fold_accuracy` with the file's folds);
  TAR@FAR over all pairs.
* View 1, ``pairsDevTest.txt`` (header ``500``) or any one-set file: the threshold is chosen on
  ``pairsDevTrain.txt`` beside it (same resolution and degradation) and applied to the file's
  pairs; accuracy and TAR@FAR on those pairs.

Scores are cosines of the L2-normalised embeddings; "same" when the squared distance
``2 - 2 cos`` is below the threshold (`verification.py`), chosen on insightface's grid 0..3.99
step 0.01 (``thresholds="grid"``, the default: the rule of insightface's verification and of our
`.bin` sets, so a `.bin` packed from a pairs file gives the same numbers) or as the best cut
between the training pairs' own distances (``"exact"``, `exact_threshold`: the rule of
../shared/realfaces/README.md's figures; View 2 with the real recognizer: 99.03 % against the
grid's 98.92 %). TAR@FAR is
insightface's rule (the ROC point nearest the FAR); View 1's 500 different pairs cannot resolve
FAR=1e-3: FPR 0 and 0.002 are equally near and the rule takes 0.002 (the real recognizer at
112 px: 0.974; the README's 0.956 is the TAR at FPR 0).

Low resolution (`degrade`): the 112 px crop is area-resized to N x N and cubic-resized back to
the model input; ``both`` degrades both faces of every pair, ``probe`` the second only. Each
image is read once and embedded once per resolution (once in all for the undegraded first faces
of ``probe``).

  python -m facemoe_jax.evaluate.lfw --model runs/demo --lfw ../shared/realfaces/lfw \
      --pairs pairs.txt --resolutions 112,24,16,12,8 --json lfw.json

``--model`` is anything `FaceEncoder.from_checkpoint` opens; ``--lfw`` the LFW folder holding
``aligned112/`` and the pairs files, or the aligned folder itself. A bad pairs file, a missing
image or model ends in one ``error:`` line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, NamedTuple

import cv2
import ml_collections
import numpy as np

from facemoe_jax.core import messages
from facemoe_jax.data.folder import read_people_file
from facemoe_jax.data.lfw_pairs import PairsList, find_pairs_file, lfw_folders, read_pairs
from facemoe_jax.evaluate import sweep, verification
from facemoe_jax.core.progress import Progress

VIEW1_TRAIN_FILE = "pairsDevTrain.txt"
DEGRADE_MODES = ("both", "probe")
THRESHOLD_SEARCHES = ("exact", "grid")
FARS = {"tar@far=1e-2": 1e-2, "tar@far=1e-3": 1e-3}  # row key -> false-accept rate
_CHUNK = 1024  # images degraded and handed to `embed` at a time (bounds the pixels in memory)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square image -> size x size: area when shrinking, cubic when enlarging, as is if equal."""
    if image.shape[0] == size:
        return image
    interpolation = cv2.INTER_AREA if size < image.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


def degrade(images: np.ndarray, size: int, model_size: int) -> np.ndarray:
    """uint8 (N, S, S, 3) crops -> (N, model_size, model_size, 3) with `size` px of information.

    Area-resized down to size x size, then resized to the model input (cubic up); a size >= S
    only resizes the crop to the model input (area down, cubic up, as is when equal). This is
    how ../shared/realfaces/README.md measured its low-resolution figures.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"degrade takes uint8 (N, S, S, 3) images, got {images.dtype} {images.shape}"
        )
    if size < 1 or model_size < 1:
        raise ValueError(f"size={size} and model_size={model_size} must be >= 1 pixel")
    small = min(int(size), images.shape[1])
    out = np.empty((len(images), model_size, model_size, images.shape[3]), np.uint8)
    for k, image in enumerate(images):
        out[k] = _resize(_resize(image, small), model_size)
    return out


PEOPLE_SEPARATOR = "@"  # "pairs.txt@peopleDevTest.txt": the pairs whose two people it lists


class Protocol(NamedTuple):
    """What `evaluate_lfw` will evaluate, checked (files exist) before anything is embedded."""

    name: str  # "view2" (k-fold on the file's sets) or "view1" (threshold from the train file)
    label: str  # row prefix: the name, plus "_" and the people file's stem when filtered
    pairs_path: str
    test: PairsList
    train_path: str | None  # View 1: pairsDevTrain.txt beside the pairs file
    train: PairsList | None
    images_dir: str
    paths: list[str]  # every image of the test (and train) pairs once, in first-use order


def _people_only(pairs_list: PairsList, people_path: str, pairs_path: str) -> PairsList:
    """The pairs whose two people are both in the people file (their folds kept)."""
    people = set(read_people_file(people_path))
    keep = np.array(
        [a.split("/")[0] in people and b.split("/")[0] in people for a, b in pairs_list.pairs]
    )
    kept_same = pairs_list.issame[keep]
    if kept_same.all() or not kept_same.any():
        raise ValueError(
            f"{pairs_path}: {int(keep.sum())} pairs have both people in {people_path}, "
            f"{int(kept_same.sum())} of them same-person; verification needs both kinds"
        )
    pairs = [pair for pair, kept in zip(pairs_list.pairs, keep) if kept]
    return PairsList(pairs, kept_same, pairs_list.folds[keep])


def load_protocol(lfw_dir: str, pairs_file: str) -> Protocol:
    """Reads the pairs file (and View 1's train file) and checks that every image exists.

    `pairs_file` "FILE@PEOPLE" keeps the pairs of FILE whose two people PEOPLE lists (an LFW
    people file, e.g. "pairs.txt@peopleDevTest.txt": the View 2 pairs among View 1's test
    people). Only the pairs of FILE are filtered: View 1's threshold still comes from all of
    pairsDevTrain.txt; View 2's from the other folds of the filtered pairs."""
    images_dir, root = lfw_folders(lfw_dir)
    spec = pairs_file
    pairs_file, _, people_file = spec.partition(PEOPLE_SEPARATOR)
    pairs_path = find_pairs_file(root, pairs_file)
    test = read_pairs(pairs_path)
    people_path = None
    if people_file:
        people_path = people_file if os.path.isabs(people_file) else os.path.join(root, people_file)
        if not os.path.isfile(people_path):
            raise ValueError(f"people file {people_path} (of {spec!r}) does not exist")
    if people_path:
        test = _people_only(test, people_path, pairs_path)
    train_path = train = None
    name = "view2" if len(np.unique(test.folds)) > 1 else "view1"
    if name == "view1":
        train_path = os.path.join(os.path.dirname(pairs_path), VIEW1_TRAIN_FILE)
        if not os.path.isfile(train_path):
            raise ValueError(
                f"{pairs_path} is one set of pairs (View 1): its threshold is chosen on "
                f"{VIEW1_TRAIN_FILE} beside it, which is missing ({train_path})"
            )
        train = read_pairs(train_path)
    paths, seen = [], set()
    for pairs_list, source in ((test, pairs_path), (train, train_path)):
        for pair in pairs_list.pairs if pairs_list is not None else ():
            for path in pair:
                if path in seen:
                    continue
                if not os.path.isfile(os.path.join(images_dir, path)):
                    raise ValueError(
                        f"image {os.path.join(images_dir, path)} of the pairs file "
                        f"{source} does not exist"
                    )
                seen.add(path)
                paths.append(path)
    label = name
    if people_path:
        label += "_" + os.path.splitext(os.path.basename(people_path))[0]
    return Protocol(name, label, pairs_path, test, train_path, train, images_dir, paths)


def _read_image(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"image {path} is not a decodable JPEG/PNG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _load_images(protocol: Protocol) -> np.ndarray:
    """uint8 (U, S, S, 3) RGB, protocol.paths in order; all crops must share one square size."""
    images = []
    with Progress("read lfw", len(protocol.paths)) as progress:
        for path in protocol.paths:
            images.append(_read_image(os.path.join(protocol.images_dir, path)))
            if images[-1].shape != images[0].shape or images[-1].shape[0] != images[-1].shape[1]:
                raise ValueError(
                    f"image {os.path.join(protocol.images_dir, path)} is {images[-1].shape[:2]}, "
                    f"expected square crops of one size like {protocol.paths[0]} "
                    f"{images[0].shape[:2]}"
                )
            progress.update()
    return np.stack(images)


class PairFaces(NamedTuple):
    """The faces of one pairs file's test pairs, each image once (`pair_faces`)."""

    label: str  # the protocol's row prefix ("view1", "view2_peopleDevTest")
    faces: np.ndarray  # uint8 (U, model_size, model_size, 3), first-use order
    index_a: np.ndarray  # (N,) the first face of each pair, into `faces`
    index_b: np.ndarray
    issame: np.ndarray  # (N,) bool


def pair_faces(lfw_dir: str, pairs_file: str, model_size: int) -> PairFaces:
    """The test pairs of `pairs_file` (anything `load_protocol` reads) with their faces read
    once and resized to the model input as the 112 px rows are (`degrade` at the crop size);
    View 1's threshold pairs are not read."""
    protocol = load_protocol(lfw_dir, pairs_file)
    paths = list(dict.fromkeys(path for pair in protocol.test.pairs for path in pair))
    index = {path: k for k, path in enumerate(paths)}
    test_only = protocol._replace(paths=paths)
    faces = _load_images(test_only)
    a, b = _pair_indices(protocol.test, index)
    return PairFaces(
        protocol.label, degrade(faces, faces.shape[1], model_size), a, b, protocol.test.issame
    )


def row_name(protocol_name: str, size: int, degrade_mode: str) -> str:
    """results.json key of one row: 'lfw_view1@12px' (both faces) or 'lfw_view1@probe12px'."""
    return sweep.entry_name(f"lfw_{protocol_name}", size, degrade_mode)


def _pair_indices(pairs_list: PairsList, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([index[a] for a, _ in pairs_list.pairs]),
        np.array([index[b] for _, b in pairs_list.pairs]),
    )


def _tars(distances: np.ndarray, issame: np.ndarray) -> dict[str, float]:
    scores = 1.0 - distances / 2.0  # the cosine
    return {key: verification.tar_at_far(scores, issame, far) for key, far in FARS.items()}


def evaluate_lfw(
    embed: Callable[[np.ndarray, bool], np.ndarray],
    lfw_dir: str,
    pairs_file: str,
    resolutions=(112,),
    degrade_mode: str = "both",
    flip_test: bool = False,
    model_size: int = 112,
    thresholds: str = "grid",
    cache: dict | None = None,
) -> dict:
    """LFW verification at each resolution (see the module docstring for the protocols).

    Args:
      embed: ``embed(images uint8 (N, model_size, model_size, 3), flip_test) -> (N, D)``, e.g.
        `FaceEncoder.embed`; normalised or not.
      lfw_dir: the LFW folder (holding aligned112/) or the aligned folder itself.
      pairs_file: absolute, or relative to the LFW folder ("pairs.txt", "pairsDevTest.txt"),
        optionally "@PEOPLE" (`load_protocol`: only the pairs among those people).
      resolutions: pixel sizes; >= the crop size means the crop as it is.
      degrade_mode: "both" faces of every pair, or the second ("probe") only.
      thresholds: "exact" (the best cut between the training pairs' distances) or "grid".
      cache: a dict shared by calls with the same `embed` and `flip_test` ({(size, image
        path): embedding}): each image is embedded once per size across them. An `embed` with
        test-time BatchNorm adaptation adapts to each call's images (one size, the images no
        earlier call embedded, at most 1,024): share a cache only between calls that all adapt
        or all do not (evaluate/suite.py: one cache per evaluation, one adaptation setting).
    Returns:
      {"protocol", "label" (the rows' prefix), "pairs_file", "threshold_pairs_file" (View 1), "pairs", "folds", "images",
       "degrade", "thresholds", "flip_test", "model_size", "rows": {row_name: metrics}}; View 2:
      accuracy, accuracy_std, best_threshold (mean of the folds'), tar@far=1e-2, tar@far=1e-3;
      View 1: accuracy, best_threshold (chosen on the train pairs), train_accuracy, the TARs.
    """
    if degrade_mode not in DEGRADE_MODES:
        raise ValueError(f"degrade_mode={degrade_mode!r} is not one of {DEGRADE_MODES}")
    if thresholds not in THRESHOLD_SEARCHES:
        raise ValueError(f"thresholds={thresholds!r} is not one of {THRESHOLD_SEARCHES}")
    resolutions = [int(r) for r in resolutions]
    if not resolutions or min(resolutions) < 1:
        raise ValueError(f"resolutions={resolutions} must be one or more sizes >= 1 pixel")
    protocol = load_protocol(lfw_dir, pairs_file)
    images = _load_images(protocol)
    crop_size = images.shape[1]
    index = {path: k for k, path in enumerate(protocol.paths)}
    sets = {"test": _pair_indices(protocol.test, index)}
    if protocol.train is not None:
        sets["train"] = _pair_indices(protocol.train, index)
    firsts = np.unique(np.concatenate([a for a, _ in sets.values()]))
    seconds = np.unique(np.concatenate([b for _, b in sets.values()]))

    embeddings = {}  # effective size -> (U, D) rows filled for the images embedded at that size
    shared = {} if cache is None else cache

    def embedded(size: int, wanted: np.ndarray, label: str) -> np.ndarray:
        table, done = embeddings.get(size, (None, np.zeros(len(images), bool)))
        for k in wanted[~done[wanted]]:
            row = shared.get((size, protocol.paths[k]))
            if row is not None:
                if table is None:
                    table = np.zeros((len(images), len(row)), np.float64)
                table[k], done[k] = row, True
        embeddings[size] = (table, done)
        todo = wanted[~done[wanted]]
        if not len(todo):
            return table
        with Progress(f"embed {label}", len(todo)) as progress:
            for start in range(0, len(todo), _CHUNK):
                chunk = todo[start : start + _CHUNK]
                rows = np.asarray(embed(degrade(images[chunk], size, model_size), flip_test))
                if table is None:
                    table = np.zeros((len(images), rows.shape[1]), np.float64)
                table[chunk] = rows
                done[chunk] = True
                shared.update(((size, protocol.paths[k]), row) for k, row in zip(chunk, rows))
                progress.update(len(chunk))
        embeddings[size] = (table, done)
        return table

    rows = {}
    for size in resolutions:
        name = row_name(protocol.label, size, degrade_mode)
        effective = min(size, crop_size)  # every size >= the crop is the crop as it is
        if degrade_mode == "both":
            first = second = embedded(effective, np.arange(len(images)), name)
        else:
            first = embedded(crop_size, firsts, f"{name} (gallery faces)")
            second = embedded(effective, seconds, name)
        distances = {
            key: verification.pair_distances(first[a], second[b]) for key, (a, b) in sets.items()
        }
        test_same = protocol.test.issame
        if protocol.name == "view2":
            metrics = verification.ten_fold_accuracy(
                distances["test"],
                test_same,
                folds=protocol.test.folds,
                thresholds="exact" if thresholds == "exact" else None,
            )
        else:
            choose = (
                verification.exact_threshold
                if thresholds == "exact"
                else verification.grid_threshold
            )
            threshold = choose(distances["train"], protocol.train.issame)
            metrics = {
                "accuracy": float(np.mean((distances["test"] < threshold) == test_same)),
                "best_threshold": threshold,
                "train_accuracy": float(
                    np.mean((distances["train"] < threshold) == protocol.train.issame)
                ),
            }
        rows[name] = {"resolution": size, **metrics, **_tars(distances["test"], test_same)}
    return {
        "protocol": protocol.name,
        "label": protocol.label,
        "pairs_file": protocol.pairs_path,
        "threshold_pairs_file": protocol.train_path,
        "pairs": len(protocol.test.pairs),
        "folds": int(len(np.unique(protocol.test.folds))),
        "images": len(protocol.paths),
        "degrade": degrade_mode,
        "thresholds": thresholds,
        "flip_test": bool(flip_test),
        "model_size": int(model_size),
        "rows": rows,
    }


def config_pairs(ev) -> list[str]:
    """config.eval.lfw_pairs as a list: one or more pairs files, comma-separated."""
    return [p.strip() for p in ev.lfw_pairs.split(",") if p.strip()]


def config_degrade_modes(ev) -> list[str]:
    """config.eval.lfw_degrade as a list: "both", "probe" or "both,probe"."""
    return [m.strip() for m in ev.lfw_degrade.split(",") if m.strip()]


def check_config(ev) -> None:
    """config.eval's LFW fields (lfw_dir, lfw_pairs, lfw_resolutions, lfw_degrade): fails fast,
    naming the field, on values that can never work; reads the pairs files, stats the images."""
    lfw_dir = ev.lfw_dir
    if not lfw_dir:
        return
    if not os.path.isdir(lfw_dir):
        raise ValueError(f"config.eval.lfw_dir={lfw_dir!r} is not a directory")
    spec = ev.lfw_resolutions
    if not sweep.parse_sizes(spec, field="config.eval.lfw_resolutions"):
        raise ValueError(f"config.eval.lfw_resolutions={spec!r} names no size")
    modes = config_degrade_modes(ev)
    if not modes or any(mode not in DEGRADE_MODES for mode in modes):
        raise ValueError(
            f"config.eval.lfw_degrade={ev.lfw_degrade!r}: give one or more of {DEGRADE_MODES}, "
            f"comma-separated"
        )
    if not config_pairs(ev) and not ev.get("lfw_quality"):  # only the quality evaluation
        raise ValueError(f"config.eval.lfw_pairs={ev.lfw_pairs!r} names no pairs file")
    for pairs in config_pairs(ev):
        try:
            load_protocol(lfw_dir, pairs)
        except ValueError as e:
            raise ValueError(f"config.eval.lfw_dir / lfw_pairs: {e}") from None


def format_table(result: dict) -> str:
    """The rows as a table: resolution, accuracy (± std for View 2), TAR@FAR=1e-2 and 1e-3."""
    if result["protocol"] == "view2":
        view = f"View 2 ({result['folds']}-fold, the folds of the file)"
    else:
        view = f"View 1 (threshold from {os.path.basename(result['threshold_pairs_file'])})"
    faces = "both faces" if result["degrade"] == "both" else "the second face of each pair"
    lines = [
        f"LFW {view}: {os.path.basename(result['pairs_file'])}, {result['pairs']} pairs, "
        f"{result['images']} images; {faces} degraded; {result['thresholds']} thresholds; "
        f"flip test {'on' if result['flip_test'] else 'off'}; model input "
        f"{result['model_size']} px",
        f"{'resolution':>10}  {'accuracy':>17}  {'TAR@FAR=1e-2':>12}  {'TAR@FAR=1e-3':>12}",
    ]
    for metrics in result["rows"].values():
        accuracy = f"{metrics['accuracy'] * 100:.2f} %"
        if "accuracy_std" in metrics:
            accuracy += f" ± {metrics['accuracy_std'] * 100:.2f}"
        lines.append(
            f"{metrics['resolution']:>7} px  {accuracy:>17}  {metrics['tar@far=1e-2']:>12.3f}  "
            f"{metrics['tar@far=1e-3']:>12.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="a workdir, an export dir, a .pt/.safetensors (config.json beside "
        "it) or anything else FaceEncoder.from_checkpoint opens",
    )
    parser.add_argument("--lfw", required=True, help="LFW folder (with aligned112/) or aligned112")
    parser.add_argument(
        "--pairs",
        default="pairs.txt",
        help="pairs file, absolute or relative to the LFW folder: pairs.txt "
        "(View 2, 10-fold) or pairsDevTest.txt (View 1)",
    )
    parser.add_argument("--resolutions", default="112,24,16,12,8", help="pixel sizes")
    parser.add_argument(
        "--degrade",
        choices=DEGRADE_MODES,
        default="both",
        help="degrade both faces of a pair or the second (probe) only",
    )
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flip test: add the embedding of the mirror image",
    )
    parser.add_argument(
        "--thresholds",
        choices=THRESHOLD_SEARCHES,
        default="grid",
        help="grid: insightface's 0..3.99 step 0.01 (as the .bin sets); exact: the best cut "
        "between the training pairs' distances",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results here as JSON")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--input-mean",
        type=float,
        default=-1.0,
        help="an ONNX model's input normalisation (pixel - mean) / std, when its documentation "
        "says other than the default (docs/onnx_import.md); e.g. 127 and 128",
    )
    parser.add_argument("--input-std", type=float, default=-1.0, help="see --input-mean")
    args = parser.parse_args(argv)
    try:
        sizes = sweep.parse_sizes(args.resolutions, field="--resolutions")
        if not sizes:
            raise ValueError(f"--resolutions={args.resolutions!r} names no size")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
        load_protocol(args.lfw, args.pairs)  # a bad pairs file or a missing image: before the model
        if not os.path.exists(args.model):
            raise ValueError(f"--model {args.model} does not exist")
        from facemoe_jax.encoder import FaceEncoder  # builds models: not needed for --help

        config = None
        if args.input_mean >= 0 or args.input_std > 0:
            if not args.model.endswith(".onnx"):
                raise ValueError("--input-mean / --input-std are for ONNX models (--model X.onnx)")
            config = ml_collections.ConfigDict(
                {
                    "model": {
                        "name": "onnx",
                        "onnx_input_mean": args.input_mean,
                        "onnx_input_std": args.input_std,
                    }
                }
            )
        encoder = FaceEncoder.from_checkpoint(args.model, config)

        def embed(images, flip_test):
            return encoder.embed(images, flip_test=flip_test, batch_size=args.batch_size)

        result = evaluate_lfw(
            embed,
            args.lfw,
            args.pairs,
            sizes,
            args.degrade,
            args.flip,
            encoder.image_size,
            args.thresholds,
        )
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"model": os.path.abspath(args.model), **result}, f, indent=2)
    except (ValueError, OSError) as e:
        messages.error(e)
        sys.exit(2)
    print(format_table(result), flush=True)
    if args.json:
        print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()
