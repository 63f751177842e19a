r"""Converters: image folders -> RecordIO, RecordIO -> ArrayRecord.

  python -m facemoe_jax.data.pack --images DIR --out OUT
      One sub-folder per identity (labels in sorted folder-name order) -> OUT/train.rec and
      OUT/train.idx, an insightface pack with meta record 0 and one record per identity, so
      any insightface tool reads it too. Image bytes are copied as they are (no re-encoding).

  python -m facemoe_jax.data.pack --recordio DIR --out OUT --to-array-record
      RecordIO pack -> OUT/train.array_record (one record per image, each a RecordIO payload:
      header, label, encoded image) and OUT/meta.json with num_images and num_classes, for
      ``config.data.train = "arrayrecord:OUT"``.

  python -m facemoe_jax.data.pack --pairs pairs.txt --images ALIGNED_DIR --out FILE.bin
      An LFW pairs file (pairs.txt, pairsDevTest.txt, ...) with its aligned images -> an
      insightface verification .bin (images img1, img2 of each pair in file order, bytes as
      they are; evaluate/lfw.py `write_pairs_bin`), the layout of insightface's lfw.bin.

The first two print the counts (a run takes them from the data; ``config.data.num_classes`` /
``num_images`` may fix them, and are then checked); all show progress with an ETA (one updating
line on a terminal, a line every 30 s in a log).

Images that do not decode (empty, truncated, not an image: the training decoder's test) are
listed with their paths, written to ``OUT/skipped_images.txt`` and left out; an identity left
without images is dropped and the labels after it renumbered. ``--fail-on-bad-images`` stops
at the first one instead. A missing input or any other problem ends in one ``error:`` line
(exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing.pool import ThreadPool

from facemoe_jax.core import messages
from facemoe_jax.data import folder, recordio, tfds_sources
from facemoe_jax.data.lfw_pairs import write_pairs_bin
from facemoe_jax.data.recordio import BadRecordError
from facemoe_jax.core.progress import Progress

SKIPPED_FILE = "skipped_images.txt"
_SHOWN_BAD = 20  # bad paths printed; all of them go to SKIPPED_FILE


def _read_checked(path: str) -> tuple[bytes | None, str | None]:
    """(file bytes, None) if the image decodes as training will decode it, else (None, why)."""
    from facemoe_jax.data.pipeline import decode_image  # imports grain: not for --help

    try:
        with open(path, "rb") as f:
            data = f.read()
        decode_image(data, key=path)
        return data, None
    except (BadRecordError, OSError) as e:
        return None, str(e)


def pack_image_folder(
    images_dir: str, out_dir: str, fail_on_bad: bool = False, workers: int | None = None
) -> tuple[int, int]:
    """Writes ``out_dir/train.rec`` and ``train.idx``; returns (num_images, num_classes).

    Every image is decoded once to check it (in `workers` threads; OpenCV releases the GIL).
    Undecodable ones are skipped and listed (``fail_on_bad``: a ValueError naming the first).
    """
    from facemoe_jax.data import pipeline  # noqa: F401  (imported before the clock starts)

    paths, labels, identities = folder.list_image_folder(images_dir)
    os.makedirs(out_dir, exist_ok=True)
    images, kept_labels, bad = [], [], []
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPool(workers) as pool, Progress("pack: read and check", len(paths)) as progress:
        results = pool.imap(_read_checked, paths, chunksize=16)
        for path, label, (data, why) in zip(paths, labels, results):
            progress.update()
            if data is not None:
                images.append(data)
                kept_labels.append(label)
                continue
            if fail_on_bad:
                raise ValueError(f"undecodable image {why} (--fail-on-bad-images)")
            bad.append((path, why))
    skipped_path = os.path.join(out_dir, SKIPPED_FILE)
    if bad:
        with open(skipped_path, "w") as f:
            f.writelines(f"{path}\t{why}\n" for path, why in bad)
        print(f"skipped {len(bad)} undecodable images (all listed in {skipped_path}):", flush=True)
        for path, why in bad[:_SHOWN_BAD]:
            print(f"  skipped {path}: {why.removeprefix(path + ': ')}", flush=True)
        if len(bad) > _SHOWN_BAD:
            print(f"  ... and {len(bad) - _SHOWN_BAD} more", flush=True)
    elif os.path.exists(skipped_path):
        os.remove(skipped_path)  # from an earlier run of the same output folder
    if not images:
        raise ValueError(f"no decodable images in {images_dir}")
    # Identities left without images: drop them, number the rest 0 .. C-1 again.
    remaining = sorted(set(kept_labels))
    if len(remaining) < len(identities):
        lost = [identities[k] for k in sorted(set(range(len(identities))) - set(remaining))]
        print(
            f"dropped {len(lost)} identities with no decodable image: {', '.join(lost[:10])}"
            + (" ..." if len(lost) > 10 else ""),
            flush=True,
        )
        renumber = {old: new for new, old in enumerate(remaining)}
        kept_labels = [renumber[k] for k in kept_labels]
    num_images = recordio.write_image_pack(os.path.join(out_dir, "train.rec"), images, kept_labels)
    return num_images, len(remaining)


def recordio_to_array_record(recordio_path: str, out_dir: str) -> tuple[int, int]:
    """Writes ``out_dir/train.array_record`` and ``meta.json``; returns (num_images, classes)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source = recordio.RecordIODataSource(recordio_path)
    os.makedirs(out_dir, exist_ok=True)
    writer = ArrayRecordWriter(os.path.join(out_dir, "train.array_record"), "group_size:1")
    try:
        with Progress("pack: to ArrayRecord", len(source)) as progress:
            for i in range(len(source)):
                record = source[i]
                writer.write(recordio.pack_payload(record["label"], record["image"]))
                progress.update()
    finally:
        writer.close()
    counts = {"num_images": len(source), "num_classes": source.num_classes}
    with open(os.path.join(out_dir, tfds_sources.META_FILE), "w") as f:
        json.dump(counts, f)
    return counts["num_images"], counts["num_classes"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--images", help="folder with one sub-folder of images per identity")
    given.add_argument("--recordio", help="RecordIO folder (train.rec/.idx) or .rec path")
    parser.add_argument("--out", required=True, help="output folder (with --pairs: the .bin file)")
    parser.add_argument(
        "--pairs", help="with --images (an aligned LFW folder): pack this pairs file as a .bin"
    )
    parser.add_argument(
        "--to-array-record", action="store_true", help="with --recordio: write ArrayRecord"
    )
    parser.add_argument(
        "--fail-on-bad-images",
        action="store_true",
        help="with --images: stop at the first undecodable image (default: skip and list them)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding threads (default: the CPU count, at most 8)",
    )
    args = parser.parse_args(argv)
    if args.recordio and not args.to_array_record:
        parser.error("--recordio needs --to-array-record (the only conversion from RecordIO)")
    if args.pairs and not args.images:
        parser.error("--pairs needs --images, the folder of the aligned images it names")
    try:
        if args.pairs:
            num_pairs = write_pairs_bin(args.pairs, args.images, args.out)
            print(f"wrote {args.out}: {num_pairs} pairs, {2 * num_pairs} images")
            return
        if args.images:
            num_images, num_classes = pack_image_folder(
                args.images, args.out, args.fail_on_bad_images, args.workers
            )
            written = os.path.join(args.out, "train.rec")
        else:
            num_images, num_classes = recordio_to_array_record(args.recordio, args.out)
            written = os.path.join(args.out, "train.array_record")
    except (ValueError, OSError) as e:  # BadRecordError is a ValueError
        messages.error(e)
        sys.exit(2)
    print(f"wrote {written}: num_images={num_images} num_classes={num_classes}")


if __name__ == "__main__":
    main()
