r"""Converters: image folders -> RecordIO, RecordIO -> ArrayRecord.

  python -m facemoe_jax.data.pack --images DIR --out OUT
      One sub-folder per identity (labels in sorted folder-name order) -> OUT/train.rec and
      OUT/train.idx, an insightface pack with meta record 0 and one record per identity, so
      any insightface tool reads it too. Image bytes are copied as they are (no re-encoding).

  python -m facemoe_jax.data.pack --recordio DIR --out OUT --to-array-record
      RecordIO pack -> OUT/train.array_record (one record per image, each a RecordIO payload:
      header, label, encoded image) and OUT/meta.json with num_images and num_classes, for
      ``config.data.train = "arrayrecord:OUT"``.

Both print the counts to put into ``config.data.num_classes`` / ``num_images``.
"""

from __future__ import annotations

import argparse
import json
import os

from facemoe_jax.data import folder, recordio, tfds_sources


def pack_image_folder(images_dir: str, out_dir: str) -> tuple[int, int]:
    """Writes ``out_dir/train.rec`` and ``train.idx``; returns (num_images, num_classes)."""
    paths, labels, identities = folder.list_image_folder(images_dir)
    os.makedirs(out_dir, exist_ok=True)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    num_images = recordio.write_image_pack(
        os.path.join(out_dir, "train.rec"), (read(p) for p in paths), labels
    )
    return num_images, len(identities)


def recordio_to_array_record(recordio_path: str, out_dir: str) -> tuple[int, int]:
    """Writes ``out_dir/train.array_record`` and ``meta.json``; returns (num_images, classes)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source = recordio.RecordIODataSource(recordio_path)
    os.makedirs(out_dir, exist_ok=True)
    writer = ArrayRecordWriter(os.path.join(out_dir, "train.array_record"), "group_size:1")
    try:
        for i in range(len(source)):
            record = source[i]
            writer.write(recordio.pack_payload(record["label"], record["image"]))
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
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--to-array-record", action="store_true", help="with --recordio: write ArrayRecord"
    )
    args = parser.parse_args(argv)
    if args.images:
        num_images, num_classes = pack_image_folder(args.images, args.out)
        written = os.path.join(args.out, "train.rec")
    else:
        if not args.to_array_record:
            parser.error("--recordio needs --to-array-record (the only conversion from RecordIO)")
        num_images, num_classes = recordio_to_array_record(args.recordio, args.out)
        written = os.path.join(args.out, "train.array_record")
    print(f"wrote {written}: num_images={num_images} num_classes={num_classes}")


if __name__ == "__main__":
    main()
