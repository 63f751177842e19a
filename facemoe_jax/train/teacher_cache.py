"""A frozen teacher's embeddings of every training record, computed once and kept on disk.

Distillation (train/objectives/distill.py) needs the teacher's HR embedding of each image the
student sees. Inside the step that is one teacher forward per image per step; a student trained
for several epochs pays it again every epoch. With `config.distill.teacher_cache` the teacher
embeds each record of the training source once, at its own input size from the source's
undegraded image, and the step looks the target up by the record's source index
(`batch["record"]`).

The cached target is the teacher's flip-test embedding, normalise(f(x) + f(mirror x)): a
random horizontal flip of the student's view then has a target that does not depend on the
draw. Other geometry (random crops) would change the HR image per draw, so a cache refuses it.

The file is named by a digest of the teacher (its weights' bytes and its input size) and holds
one row per record name: an image file's path with its size and modification time (a record of
a source without paths: the source's description and the index). A run on another subset of the
same images (a validation split) embeds only the records the file lacks and adds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.pipeline import BadRecordError, DecodeAndResize, eval_batches

DEFAULT_DIR = os.path.join("~", ".cache", "facemoe_jax", "teacher_embeddings")
AUTO = "auto"  # config.distill.teacher_cache: DEFAULT_DIR, or $FACEMOE_CACHE_DIR/teacher_embeddings


def cache_dir(setting: str) -> str:
    """The folder a `config.distill.teacher_cache` setting names ("auto": the user cache)."""
    if setting == AUTO:
        root = os.environ.get("FACEMOE_CACHE_DIR")
        folder = os.path.join(root, "teacher_embeddings") if root else DEFAULT_DIR
        return os.path.expanduser(folder)
    return os.path.expanduser(setting)


def teacher_key(variables, image_size: int) -> str:
    """A digest of the teacher's weights and input size: the cache file's name."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0], key=str):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.asarray(leaf).tobytes())
    digest.update(json.dumps({"image_size": int(image_size), "target": "flip test"}).encode())
    return digest.hexdigest()[:24]


def record_names(source) -> list[str]:
    """A name per record that changes when its image does: path, size and mtime of each file
    of a source with `paths`; else the source's description and the record's index."""
    paths = getattr(source, "paths", None)
    if paths is None:
        return [f"{source!r}#{i}" for i in range(len(source))]
    names = []
    for path in paths:
        stat = os.stat(path)
        names.append(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}")
    return names


def embed_records(
    embed, variables, source, indices, image_size: int, batch_size: int = 64
) -> np.ndarray:
    """(len(indices), D) float32: normalise(f(x) + f(mirror x)) of those records' images,
    decoded and resized to `image_size` as the training pipeline does; `embed(variables,
    images in [-1, 1]) -> (B, D)`. An unreadable record gets a zero row: the pipeline replaces
    it by the next readable one, whose own index it reports, so the row is never looked up."""
    decode = DecodeAndResize(image_size)

    @jax.jit
    def flip_test(variables, images):
        x = normalize_images(images)
        both = embed(variables, x).astype(jnp.float32) + embed(variables, x[:, :, ::-1]).astype(
            jnp.float32
        )
        return both / jnp.maximum(jnp.linalg.norm(both, axis=-1, keepdims=True), 1e-12)

    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        images, readable = [], []
        for i in chunk:
            try:
                images.append(decode(source[int(i)])["image"])
                readable.append(True)
            except BadRecordError:
                images.append(np.zeros((image_size, image_size, 3), np.uint8))
                readable.append(False)
        for batch, valid in eval_batches(np.stack(images), batch_size):
            rows = np.asarray(flip_test(variables, batch))[:valid]
            out.append(np.where(np.asarray(readable)[:, None], rows, 0.0).astype(np.float32))
    return np.concatenate(out)


def load_or_build(embed, variables, image_size: int, source, folder: str, describe: str):
    """The (len(source), D) table of this teacher for `source`, row i for record i: read from
    the teacher's file in `folder`, the records it lacks embedded now and added to it. Prints
    one line saying which, and what it cost."""
    path = os.path.join(folder, f"{teacher_key(variables, image_size)}.npz")
    names = record_names(source)
    stored_names, stored = np.zeros(0, str), None
    if os.path.isfile(path):
        with np.load(path) as saved:
            stored_names, stored = saved["names"], saved["embeddings"]
    row_of = {name: row for row, name in enumerate(stored_names.tolist())}
    missing = [i for i, name in enumerate(names) if name not in row_of]
    if not missing:
        print(f"teacher embeddings: {len(names)} records read from {path}", flush=True)
        return stored[[row_of[name] for name in names]]
    t0 = time.perf_counter()
    new = embed_records(embed, variables, source, missing, image_size)
    seconds = time.perf_counter() - t0
    all_names = np.concatenate([stored_names, np.asarray([names[i] for i in missing])])
    table = new if stored is None else np.concatenate([stored, new])
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(partial, names=all_names, embeddings=table)
    os.replace(partial, path)  # a reader never sees a half-written file
    print(
        f"teacher embeddings: {describe} embedded {len(missing)} of {len(names)} records "
        f"(x2, mirrored) in {seconds:.0f} s ({2 * len(missing) / seconds:.1f} img/s), kept in "
        f"{path}",
        flush=True,
    )
    row_of = {name: row for row, name in enumerate(all_names.tolist())}
    return table[[row_of[name] for name in names]]
