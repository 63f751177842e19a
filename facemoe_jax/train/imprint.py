"""Class centres imprinted from the start model's embeddings (`config.loss.centre_init="imprint"`).

Why: a pre-trained recognizer fine-tuned on new identities with a margin loss starts with random
centres, so the first steps pull every embedding towards a random direction and the margin loss
starts tens of nats above its floor. Imprinting (Qi, Brown and Lowe, "Low-shot learning with
imprinted weights", CVPR 2018) sets each new class's centre to the normalised mean of the start
model's L2-normalised embeddings of that class's images, so the margin loss starts where the
pre-trained features already separate the classes.

The images are the training records as stored (decoded and resized to the model input as the
training pipeline does, no
augmentation and no degradation: the HR view), up to `config.loss.imprint_images_per_class`
per class, in record order; classes with no readable image keep their initialiser.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data.pipeline import BadRecordError, DecodeAndResize


def class_mean_embeddings(
    model,
    variables,
    source,
    num_classes: int,
    image_size: int,
    per_class: int,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """((num_classes, D) normalised means of normalised embeddings, (num_classes,) images used).

    A class with no image gets a zero row. Records labelled outside [0, num_classes) (the
    unlabelled images of a folder) are skipped, as are unreadable ones."""
    if per_class < 1:
        raise ValueError(f"config.loss.imprint_images_per_class={per_class} must be >= 1")
    embed = jax.jit(lambda v, x: model.apply(v, normalize_images(x), train=False)[0])
    decode = DecodeAndResize(image_size)  # as the training pipeline feeds the model
    counts = np.zeros(num_classes, np.int64)
    sums = None
    images, labels = [], []

    def flush():
        nonlocal sums
        batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
        batch[: len(images)] = np.stack(images)
        rows = np.asarray(embed(variables, jnp.asarray(batch)), np.float64)[: len(images)]
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        if sums is None:
            sums = np.zeros((num_classes, rows.shape[1]))
        np.add.at(sums, np.asarray(labels), rows)
        images.clear()
        labels.clear()

    for index in range(len(source)):
        if counts.min() >= per_class:
            break
        try:
            record = source[index]
            label = int(record["label"])
            if not 0 <= label < num_classes or counts[label] >= per_class:
                continue
            image = decode(record)["image"]
        except BadRecordError:
            continue
        images.append(image)
        labels.append(label)
        counts[label] += 1
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    if sums is None:
        raise ValueError("config.loss.centre_init='imprint': no readable labelled training image")
    means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return means, counts


def imprint_centres(state, model, source, config):
    """`state` with its first num_classes centres imprinted (the rest, padding rows, kept)."""
    t0 = time.perf_counter()
    num_classes = int(config.data.num_classes)
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    means, counts = class_mean_embeddings(
        model,
        variables,
        source,
        num_classes,
        config.model.image_size,
        int(config.loss.imprint_images_per_class),
        int(config.eval.batch_size),
    )
    centres = state.params["classifier"]["centers"]
    merged = np.asarray(centres).copy()
    found = counts > 0
    merged[:num_classes][found] = means[found].astype(merged.dtype)
    params = dict(state.params)
    params["classifier"] = {"centers": jax.device_put(merged, centres.sharding)}
    print(
        f"class centres imprinted from {int(counts.sum())} training images "
        f"(up to {config.loss.imprint_images_per_class} per class) for {int(found.sum())} of "
        f"{num_classes} classes in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return state.replace(params=params)
