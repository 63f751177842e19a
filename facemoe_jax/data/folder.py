"""Image folders, one sub-folder per identity: ``root/<identity>/<image>.jpg``.

Labels are the identities' positions in the sorted list of sub-folder names (so ``0 .. C-1``,
independent of the file system's listing order); images within an identity are sorted by name.
Files whose extension is not an image's are ignored; an identity folder without images is an
error (it would shift every later label if silently dropped).
"""

from __future__ import annotations

import os

import numpy as np

from facemoe_jax.data.recordio import BadRecordError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, identity names) of a folder-per-identity tree, in sorted order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    identities = sorted(
        name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))
    )
    if not identities:
        raise ValueError(f"image folder {root} has no identity sub-folders")
    paths, labels = [], []
    for label, name in enumerate(identities):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"identity folder {folder} holds no images {IMAGE_EXTENSIONS}")
        paths += [os.path.join(folder, f) for f in files]
        labels += [label] * len(files)
    return paths, labels, identities


class ImageFolderSource:
    """Random-access source over ``root/<identity>/<image>``: encoded bytes read on demand.

    Record ``i`` is ``{"image": encoded bytes, "label": int, "key": path}``.
    """

    def __init__(self, root: str):
        self.root = root
        paths, labels, self.identities = list_image_folder(root)
        self._paths = np.array(paths)
        self._labels = np.array(labels, np.int64)

    @property
    def num_images(self) -> int:
        return len(self._paths)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        path = str(self._paths[index])
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as e:
            raise BadRecordError(f"{path}: unreadable ({e.strerror})") from None
        return {"image": image, "label": int(self._labels[index]), "key": path}

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource({self.root!r}, num_images={self.num_images}, "
            f"num_classes={self.num_classes})"
        )
