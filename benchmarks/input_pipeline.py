"""Input pipeline throughput: decode + official FaceMoE augmentation from RecordIO, per CPU core.

Writes a RecordIO pack of synthetic 112x112 JPEG faces, then times, in one process on one core
(OpenCV threads pinned to 1):
  ours:      the grain pipeline (shuffle, read, OpenCV decode, resize to 120, the official
             degradations via ``augment.Augmenter``, batching; uint8 out, normalised on device);
  reference: the official augmenter's style, as the PyTorch tools run it per image: PIL decode,
             each augmentation with ``np.random`` (crop with zero padding, down-up resize with
             random OpenCV interpolations, PIL colour jitter in random order, flip), PIL resize
             to 120, ToTensor + Normalize in float32 (CHW), then stacking the batch.
Both read the same records with the same reader. Prints both rates and their ratio; the last
line is one JSON object.

  python -m benchmarks.input_pipeline [--images 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import cv2
import numpy as np
from PIL import Image, ImageEnhance

from configs import demo
from facemoe_jax.data import augment, pipeline, recordio, synthetic

SIZE, INPUT = 112, 120
INTERPOLATIONS = (
    cv2.INTER_NEAREST,
    cv2.INTER_LINEAR,
    cv2.INTER_AREA,
    cv2.INTER_CUBIC,
    cv2.INTER_LANCZOS4,
)


def write_pack(path: str, num_images: int, unique: int = 200) -> None:
    faces = [
        cv2.imencode(
            ".jpg",
            cv2.cvtColor(synthetic.render_identity_image(k, 0, SIZE, seed=0), cv2.COLOR_RGB2BGR),
        )[1].tobytes()
        for k in range(unique)
    ]
    images = [faces[k % unique] for k in range(num_images)]
    labels = [k * unique // num_images for k in range(num_images)]
    recordio.write_image_pack(path, images, labels)


def reference_sample(data: bytes) -> np.ndarray:
    """One image the way a PyTorch face tool's Dataset.__getitem__ prepares it."""
    image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    if np.random.rand() < 0.2:  # crop with zero padding (RandomResizedCrop box)
        h, w = image.shape[:2]
        for _ in range(10):
            area = h * w * np.random.uniform(0.2, 1.0)
            aspect = np.exp(np.random.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)
                out = np.zeros_like(image)
                out[top : top + ch, left : left + cw] = image[top : top + ch, left : left + cw]
                image = out
                break
    if np.random.rand() < 0.2:  # low resolution
        h, w = image.shape[:2]
        ratio = np.random.uniform(0.2, 1.0)
        down, up = np.random.choice(INTERPOLATIONS, 2)
        small = cv2.resize(
            image, (max(1, int(w * ratio)), max(1, int(h * ratio))), None, 0, 0, down
        )
        image = cv2.resize(small, (w, h), None, 0, 0, up)
    pil = Image.fromarray(image)
    if np.random.rand() < 0.2:  # photometric, random order
        enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        for k in np.random.permutation(3):
            pil = enhancers[k](pil).enhance(np.random.uniform(0.5, 1.5))
    if np.random.rand() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pil = pil.resize((INPUT, INPUT), Image.Resampling.BILINEAR)
    tensor = np.asarray(pil, np.float32).transpose(2, 0, 1) / 255.0  # ToTensor
    return (tensor - 0.5) / 0.5  # Normalize


def time_reference(source, num_images: int, batch: int) -> float:
    np.random.seed(0)
    order = np.random.permutation(len(source))
    start = time.perf_counter()
    for b in range(0, num_images, batch):
        samples = [source[int(i)] for i in order[b : b + batch]]
        np.stack([reference_sample(s["image"]) for s in samples])
        np.asarray([s["label"] for s in samples])
    return num_images / (time.perf_counter() - start)


def time_ours(source, num_images: int, batch: int) -> float:
    config = demo.get_config().data
    augment.official_augmentation(config)
    iterator = pipeline.train_iterator(
        source,
        global_batch_size=batch,
        seed=0,
        augment=augment.Augmenter(config),
        image_size=INPUT,
        shard_index=0,
        shard_count=1,
        prefetch=0,  # synchronous: one core, no helper thread
    )
    next(iterator)  # warm-up: first-call costs outside the timing
    start = time.perf_counter()
    for _ in range(num_images // batch):
        next(iterator)
    return num_images // batch * batch / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_pack(os.path.join(tmp, "train.rec"), args.images)
        source = recordio.RecordIODataSource(tmp)
        reference = time_reference(source, args.images, args.batch)
        ours = time_ours(source, args.images, args.batch)
    print(f"reference (per-image PIL/OpenCV + np.random, float32 out): {reference:8.0f} img/s/core")
    print(f"ours (grain, OpenCV decode, seeded degradations, uint8 out): {ours:8.0f} img/s/core")
    print(f"ratio ours/reference: {ours / reference:.2f}x")
    figures = {
        "images": args.images,
        "image_size": SIZE,
        "input_size": INPUT,
        "reference_img_per_s_per_core": round(reference, 1),
        "ours_img_per_s_per_core": round(ours, 1),
        "ratio": round(ours / reference, 3),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
