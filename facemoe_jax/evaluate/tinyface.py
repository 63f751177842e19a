"""TinyFace (QMUL) 1:N identification: rank-1/5/20 of probes against matches + distractors.

Layout (the released `Testing_Set/`, or an aligned copy such as `tinyface_aligned_112/` that keeps
the file stems):
  <root>/Probe/*, <root>/Gallery_Match/*, <root>/Gallery_Distractor/*
  probe_img_ID_pairs.mat (probe_set, probe_ids), gallery_match_img_ID_pairs.mat (gallery_set,
  gallery_ids), in <root> or in a separate `mat_dir` (the aligned copies often lack them).

Probe and gallery-match lists come from the .mat files when they are there (each listed file's
stem is looked up in the image folder, so `x.jpg` in the .mat finds an aligned `x.png`), and
otherwise from the folders. Identity = the integer before the first `_` of the file name; the
.mat ids must agree. Distractors are every image in Gallery_Distractor, label -100.

Score = cosine similarity of the flip-summed embeddings. A probe is correct at rank k when a
gallery image of its identity is among its k most similar. The gallery (~158k) is scored in blocks
while a running top-k per probe is kept, so memory is probes x (block + k), never probes x gallery.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

DISTRACTOR_LABEL = -100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
RANKS = (1, 5, 20)


def identity_of(file_name: str) -> int:
    stem = os.path.basename(file_name).split("_")[0]
    try:
        return int(stem)
    except ValueError:
        raise ValueError(
            f"TinyFace file name {file_name!r} does not start with an integer identity"
        ) from None


def _images_in(folder: str) -> dict[str, str]:
    """{file stem: path} of the images in a folder (sorted walk, subfolders included)."""
    if not os.path.isdir(folder):
        raise ValueError(f"TinyFace folder {folder} does not exist")
    found = {}
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found[os.path.splitext(name)[0]] = os.path.join(directory, name)
    if not found:
        raise ValueError(f"TinyFace folder {folder} holds no images")
    return found


def _from_mat(mat_path: str, set_key: str, ids_key: str, folder_images: dict[str, str]):
    import scipy.io

    content = scipy.io.loadmat(mat_path)
    for key in (set_key, ids_key):
        if key not in content:
            raise ValueError(f"{mat_path} has no field {key!r} (fields: {sorted(content)})")
    names = [str(np.asarray(entry).reshape(-1)[0]) for entry in content[set_key].reshape(-1)]
    ids = np.asarray(content[ids_key]).reshape(-1).astype(np.int64)
    if len(names) != len(ids):
        raise ValueError(f"{mat_path}: {len(names)} entries in {set_key} but {len(ids)} ids")
    paths, labels = [], []
    for name, mat_id in zip(names, ids):
        stem = os.path.splitext(os.path.basename(name))[0]
        if stem not in folder_images:
            raise ValueError(f"{mat_path} lists {name}, which is not in the image folder")
        if identity_of(name) != mat_id:
            raise ValueError(f"{mat_path}: {name} has id {mat_id} but its file name says otherwise")
        paths.append(folder_images[stem])
        labels.append(int(mat_id))
    return paths, np.array(labels, np.int64)


def _from_folder(folder_images: dict[str, str]):
    paths = list(folder_images.values())
    return paths, np.array([identity_of(p) for p in paths], np.int64)


class TinyFaceProtocol:
    """The probe list and the gallery (matches then distractors) with their labels."""

    def __init__(self, root: str, mat_dir: str = ""):
        if not os.path.isdir(root):
            raise ValueError(f"config.eval.tinyface_dir={root!r} is not a directory")
        mat_dir = mat_dir or root
        probes = _images_in(os.path.join(root, "Probe"))
        matches = _images_in(os.path.join(root, "Gallery_Match"))
        distractors = _images_in(os.path.join(root, "Gallery_Distractor"))
        probe_mat = os.path.join(mat_dir, "probe_img_ID_pairs.mat")
        gallery_mat = os.path.join(mat_dir, "gallery_match_img_ID_pairs.mat")
        if os.path.isfile(probe_mat) != os.path.isfile(gallery_mat):
            raise ValueError(f"{mat_dir} has only one of the two TinyFace .mat lists")
        if os.path.isfile(probe_mat):
            self.probe_paths, self.probe_labels = _from_mat(
                probe_mat, "probe_set", "probe_ids", probes
            )
            match_paths, match_labels = _from_mat(
                gallery_mat, "gallery_set", "gallery_ids", matches
            )
        else:
            self.probe_paths, self.probe_labels = _from_folder(probes)
            match_paths, match_labels = _from_folder(matches)
        self.gallery_paths = match_paths + list(distractors.values())
        self.gallery_labels = np.concatenate(
            [match_labels, np.full(len(distractors), DISTRACTOR_LABEL, np.int64)]
        )

    @staticmethod
    def load(path: str, image_size: int) -> np.ndarray:
        """uint8 (S, S, 3) RGB at the model input, as FaceMoE's TinyFace script prepares it.

        That script (validation_lq/validate_tinyface.py) reads with OpenCV, converts BGR -> RGB,
        and resizes with torchvision's ``Resize((S, S), BICUBIC)`` on a PIL image, i.e. PIL's
        bicubic filter (a = -0.5, widened when shrinking); then ``ToTensor`` and
        ``Normalize(0.5, 0.5)`` = (x/255 - 0.5)/0.5, which the embedder applies. PIL rounds the
        resized pixels to uint8, as here.
        """
        from PIL import Image  # Pillow is a matplotlib dependency

        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read TinyFace image {path}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if image.shape[:2] != (image_size, image_size):
            resized = Image.fromarray(image).resize(
                (image_size, image_size), Image.Resampling.BICUBIC
            )
            image = np.asarray(resized)
        return image


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k_gallery(
    probe_features: np.ndarray,
    gallery_features: np.ndarray,
    k: int,
    block_size: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (Q, k) and cosine scores (Q, k) of each probe's k most similar gallery images.

    Ordered from most similar (ties inside the top k by gallery index; which of several images
    tied exactly at the k-th score is kept is unspecified).
    """
    probes = _normalize(probe_features)
    num_gallery = len(gallery_features)
    k = min(k, num_gallery)
    best_scores = np.zeros((len(probes), 0), np.float32)
    best_index = np.zeros((len(probes), 0), np.int64)
    for start in range(0, num_gallery, block_size):
        block = _normalize(gallery_features[start : start + block_size])
        scores = np.concatenate([best_scores, probes @ block.T], axis=1)
        block_index = np.arange(start, start + len(block))
        index = np.concatenate(
            [best_index, np.broadcast_to(block_index, (len(probes), len(block)))], 1
        )
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, keep, 1)
            index = np.take_along_axis(index, keep, 1)
        order = np.lexsort((index, -scores), axis=1)
        best_scores = np.take_along_axis(scores, order, 1)
        best_index = np.take_along_axis(index, order, 1)
    return best_index, best_scores


def rank_k_accuracy(
    probe_features: np.ndarray,
    probe_labels: np.ndarray,
    gallery_features: np.ndarray,
    gallery_labels: np.ndarray,
    ranks=RANKS,
    block_size: int = 8192,
) -> dict[str, float]:
    """{"rank1": ..., "rank5": ..., "rank20": ...}: share of probes with a same-identity image
    among their k most similar gallery images (probes without any match count as misses)."""
    index, _ = top_k_gallery(probe_features, gallery_features, max(ranks), block_size)
    hits = np.asarray(gallery_labels)[index] == np.asarray(probe_labels)[:, None]
    return {f"rank{k}": float(np.mean(hits[:, :k].any(axis=1))) for k in ranks}


def evaluate_tinyface(protocol: TinyFaceProtocol, embed_files, image_size: int, block_size=8192):
    """Runs the protocol given `embed_files(load_fn, count) -> (count, D)` features."""
    probe_features = embed_files(
        lambda i: protocol.load(protocol.probe_paths[i], image_size), len(protocol.probe_paths)
    )
    gallery_features = embed_files(
        lambda i: protocol.load(protocol.gallery_paths[i], image_size),
        len(protocol.gallery_paths),
    )
    return rank_k_accuracy(
        probe_features,
        protocol.probe_labels,
        gallery_features,
        protocol.gallery_labels,
        block_size=block_size,
    )
