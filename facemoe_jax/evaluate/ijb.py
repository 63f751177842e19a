"""IJB-B / IJB-C 1:1 template verification, computed as insightface's IJB evaluation does.

Files under the set's root (``name`` = "ijbb" or "ijbc"):
  meta/{name}_face_tid_mid.txt        image_name template_id media_id        (one line per face)
  meta/{name}_template_pair_label.txt template1 template2 label            (one line per pair)
  meta/{name}_name_5pts_score.txt     image_name x1 y1 ... x5 y5 detector_score
  loose_crop/<image_name>

Steps:
1. align each loose crop to the ArcFace template with the similarity transform that best maps its
   five landmarks onto the template's (least squares). ``alignment="official"`` (the default, as
   FaceMoE's ``validation_ijb/eval_ijb.py`` and insightface's IJB script do it): warp to the
   112x112 template (bilinear, black border), then resize bilinearly to the model's input size, two
   interpolations; ``"direct"``: one warp straight to the input size with the template scaled by
   size/112 (one interpolation, but not how the published numbers were measured: at 120 px the
   faces differ by 0.65 grey levels on average, and on a synthetic IJB-C folder an exported
   Swin-MoE scored TAR@FAR=1e-2 0.528 this way against the official script's 0.500);
2. image feature = f(x) + f(flip x) (not normalised) times the detector score;
3. media feature = mean of its images; template feature = sum of its media, then L2-normalised;
4. score of a pair = dot product of its two template features, computed in blocks of pairs so
   IJB-C's ~15.7M pairs never need more than ``block_size x D`` floats at once;
5. TAR at FAR 1e-6 .. 1e-1 with the nearest-FPR rule of `verification.tar_at_far`.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from facemoe_jax.evaluate import verification

# (x, y) of left eye, right eye, nose tip, left and right mouth corner in a 112x112 aligned face.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
ALIGNMENTS = ("official", "direct")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix [[a, -b, tx], [b, a, ty]] minimising sum ||M [x, y, 1] - dst||^2.

    A similarity (rotation, uniform scale, translation; no reflection) is linear in (a, b, tx,
    ty), so the least-squares fit is one small linear solve.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (P >= 2, 2) point arrays, got {src.shape} and {dst.shape}")
    x, y = src[:, 0], src[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    rows_x = np.stack([x, -y, ones, zeros], axis=1)  # a*x - b*y + tx = u
    rows_y = np.stack([y, x, zeros, ones], axis=1)  # b*x + a*y + ty = v
    design = np.concatenate([rows_x, rows_y])
    target = np.concatenate([dst[:, 0], dst[:, 1]])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def check_alignment(alignment: str) -> str:
    if alignment not in ALIGNMENTS:
        raise ValueError(
            f"config.eval.ijb_alignment={alignment!r} must be one of {', '.join(ALIGNMENTS)}"
        )
    return alignment


def align_face(
    image: np.ndarray, landmarks: np.ndarray, image_size: int, alignment: str = "official"
) -> np.ndarray:
    """Warps a loose crop so its 5 landmarks land on the ArcFace template, (S, S) out.

    "official": similarity to the 112x112 template, bilinear warp to 112x112 (border 0), then
    bilinear `cv2.resize` to image_size (skipped at 112). "direct": one bilinear warp to
    image_size with the template scaled by image_size/112.
    """
    check_alignment(alignment)
    landmarks = np.asarray(landmarks).reshape(5, 2)
    warp_size = 112 if alignment == "official" else image_size
    template = ARCFACE_TEMPLATE_112 * (warp_size / 112.0)
    matrix = similarity_transform(landmarks, template)
    face = cv2.warpAffine(image, matrix, (warp_size, warp_size), borderValue=0.0)
    if warp_size != image_size:
        face = cv2.resize(face, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    return face


def _read_columns(path: str, num_columns: int) -> list[list[str]]:
    if not os.path.isfile(path):
        raise ValueError(f"IJB meta file {path} does not exist")
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != num_columns:
                raise ValueError(
                    f"{path}:{line_number}: expected {num_columns} fields, got {len(fields)}"
                )
            rows.append(fields)
    if not rows:
        raise ValueError(f"IJB meta file {path} is empty")
    return rows


class IJBMeta:
    """The faces (image, template, media, 5 landmarks, detector score) and pairs of an IJB set."""

    def __init__(self, root: str, name: str, alignment: str = "official"):
        self.alignment = check_alignment(alignment)
        if name not in ("ijbb", "ijbc"):
            raise ValueError(f"IJB set name must be 'ijbb' or 'ijbc', got {name!r}")
        if not os.path.isdir(root):
            raise ValueError(f"{name} root {root!r} is not a directory")
        self.root, self.name = root, name
        meta = os.path.join(root, "meta")
        faces = _read_columns(os.path.join(meta, f"{name}_face_tid_mid.txt"), 3)
        points_path = os.path.join(meta, f"{name}_name_5pts_score.txt")
        points = {row[0]: row[1:] for row in _read_columns(points_path, 12)}
        pairs = _read_columns(os.path.join(meta, f"{name}_template_pair_label.txt"), 3)

        self.image_names = [row[0] for row in faces]
        missing = [n for n in self.image_names if n not in points]
        if missing:
            raise ValueError(
                f"{points_path} has no landmarks for {len(missing)} faces: {missing[:3]}"
            )
        self.templates = np.array([int(row[1]) for row in faces], np.int64)
        self.medias = np.array([int(row[2]) for row in faces], np.int64)
        values = np.array([points[n] for n in self.image_names], np.float64)
        self.landmarks = values[:, :10].reshape(-1, 5, 2)
        self.detector_scores = values[:, 10]
        pair_values = np.array(pairs, np.int64)
        self.pair_templates = pair_values[:, :2]
        self.pair_labels = pair_values[:, 2].astype(bool)
        unknown = np.setdiff1d(self.pair_templates, self.templates)
        if unknown.size:
            raise ValueError(
                f"{name}: {unknown.size} templates in the pair list have no faces, e.g. {unknown[:3]}"
            )

    def __len__(self) -> int:
        return len(self.image_names)

    def load_aligned(self, index: int, image_size: int) -> np.ndarray:
        """uint8 (S, S, 3) RGB aligned face number `index`."""
        path = os.path.join(self.root, "loose_crop", self.image_names[index])
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read IJB image {path}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return align_face(image, self.landmarks[index], image_size, self.alignment)


def template_features(
    image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Media-then-template pooling.

    Args:
      image_features: (F, D) per-face features (already flip-summed and score-weighted).
      templates, medias: (F,) template and media id of each face.
    Returns:
      (template_ids (T,) sorted, features (T, D) L2-normalised): each template is the sum over
      its media of the mean of that media's faces.
    """
    image_features = np.asarray(image_features, np.float64)
    template_ids, template_of_face = np.unique(templates, return_inverse=True)
    # A media belongs to one template here; (template, media) keys keep them apart regardless.
    keys = np.stack([template_of_face, np.asarray(medias)], axis=1)
    media_keys, media_of_face = np.unique(keys, axis=0, return_inverse=True)
    media_of_face = media_of_face.reshape(-1)
    media_sum = np.zeros((len(media_keys), image_features.shape[1]))
    np.add.at(media_sum, media_of_face, image_features)
    media_mean = media_sum / np.bincount(media_of_face)[:, None]
    pooled = np.zeros((len(template_ids), image_features.shape[1]))
    np.add.at(pooled, media_keys[:, 0], media_mean)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return template_ids, pooled / np.maximum(norms, 1e-12)


def pair_scores(
    template_ids: np.ndarray,
    features: np.ndarray,
    pair_templates: np.ndarray,
    block_size: int = 1_000_000,
) -> np.ndarray:
    """(P,) dot products of the template features of each pair, block_size pairs at a time."""
    rows = np.searchsorted(template_ids, pair_templates)
    if np.any(rows >= len(template_ids)) or np.any(
        template_ids[np.minimum(rows, len(template_ids) - 1)] != pair_templates
    ):
        raise ValueError("pair_templates names templates that have no features")
    scores = np.empty(len(pair_templates), np.float64)
    for start in range(0, len(pair_templates), block_size):
        block = rows[start : start + block_size]
        scores[start : start + block_size] = np.einsum(
            "pd,pd->p", features[block[:, 0]], features[block[:, 1]]
        )
    return scores


def tar_at_fars(scores: np.ndarray, labels: np.ndarray, fars=IJB_FARS) -> dict[str, float]:
    """{"tar@far=1e-4": ...} for each FAR, from one ROC (the rule of `verification.tar_at_far`)."""
    fpr, tpr, _ = verification.roc_curve(scores, labels)
    out = {}
    for far in fars:
        last_nearest = len(fpr) - 1 - int(np.argmin(np.abs(fpr - far)[::-1]))
        out[f"tar@far={far:.0e}".replace("e-0", "e-")] = float(tpr[last_nearest])
    return out


def evaluate_ijb(meta: IJBMeta, embed_files, block_size: int = 1_000_000):
    """Runs the protocol given `embed_files(load_fn, count) -> (F, D) flip-summed raw features`.

    Returns (metrics, (scores, labels)) so callers can draw the ROC.
    """
    features = embed_files(meta.load_aligned, len(meta))
    features = np.asarray(features, np.float64) * meta.detector_scores[:, None]
    template_ids, pooled = template_features(features, meta.templates, meta.medias)
    scores = pair_scores(template_ids, pooled, meta.pair_templates, block_size)
    return tar_at_fars(scores, meta.pair_labels), (scores, meta.pair_labels)
