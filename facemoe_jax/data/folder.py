"""Image folders, one sub-folder per identity: ``root/<identity>/<image>.jpg``.

Labels are the positions of the labelled identities in their sorted list of sub-folder names
(so ``0 .. C-1``, independent of the file system's listing order); images within an identity
are sorted by name. Files whose extension is not an image's are left out (and counted, so the
pre-check can say so); an identity folder without images is an error (it would shift every
later label if silently dropped).

Which identities, which labels:
  - a people list (``people_file``) keeps only the identities it names; an exclusion list
    (``exclude_people_file``) drops the ones it names. Both take LFW's people files (a count
    line, then ``Name<TAB>images`` lines; ``people.txt``'s folds of such blocks too) or one
    name per line. A listed name without a folder is an error naming the name and the file.
  - identities with fewer than ``min_images_per_identity`` images keep their images in the
    data with label -1, "no class": the margin loss and its accuracy leave such images out
    (losses/classifier.py), objectives that need no label (distillation) still use them. The
    class count is that of the labelled identities.

``check_images`` decodes every image once, in threads, as training will decode it: the
training loop runs it before compiling so that an undecodable file stops the run at once,
named, instead of after compilation.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from multiprocessing.pool import ThreadPool

import numpy as np

from facemoe_jax.data.recordio import BadRecordError

# .jp2 only where OpenCV has a JPEG 2000 decoder (OpenJPEG; the PyPI wheels do): elsewhere the
# pre-check names the files it cannot decode.
IMAGE_EXTENSIONS = tuple(".jpg .jpeg .png .bmp .webp .tif .tiff .pgm .ppm .pbm .pnm .jp2".split())
UNLABELLED = -1


def _is_count(text: str) -> bool:
    return text.isdigit()


def read_people_file(path: str) -> list[str]:
    """The names of a people list, in file order.

    Formats: LFW's (``peopleDevTrain.txt``: a count line, then that many ``Name<TAB>images``
    lines; ``people.txt``: a fold count, then per fold a count line and its lines), recognised
    by its tab-separated lines; otherwise one name per line (names may be numbers). Blank lines
    are ignored.

    Raises:
      ValueError: naming the file and line for a count that disagrees with the lines after it,
        a malformed line or a name listed twice.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"people file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ValueError(f"people file {path} lists no names")
    if any("\t" in line for _, line in lines):
        names = _lfw_people(lines, path)
    else:
        names = [line for _, line in lines]
    duplicates = [name for name, count in collections.Counter(names).items() if count > 1]
    if duplicates:
        raise ValueError(f"people file {path} lists {duplicates[0]!r} more than once")
    return names


def _lfw_people(lines: list[tuple[int, str]], path: str) -> list[str]:
    """Names of LFW-format lines: blocks of a count line and that many ``Name<TAB>n`` lines,
    after a block count when the file starts with two count lines (``people.txt``)."""
    first_number, first = lines[0]
    if not _is_count(first):
        raise ValueError(
            f"people file {path} line {first_number}: {first!r} is not a count (LFW's format "
            "starts with the number of names that follow)"
        )
    expected_blocks = 1
    if len(lines) > 1 and _is_count(lines[1][1]):
        expected_blocks, lines = int(first), lines[1:]
    names, blocks, position = [], 0, 0
    while position < len(lines):
        number, count = lines[position]
        if not _is_count(count):
            raise ValueError(
                f"people file {path} line {number}: {count!r} where a count line was expected "
                "(the count before it says fewer names than follow)"
            )
        block = lines[position + 1 : position + 1 + int(count)]
        for line_number, line in block:
            name, _, images = line.partition("\t")
            if not name or not _is_count(images.strip()):
                raise ValueError(
                    f"people file {path} line {line_number}: {line!r} is not "
                    f"'Name<TAB>images' (the count line {number} says {count} names follow)"
                )
            names.append(name)
        if len(block) < int(count):
            raise ValueError(
                f"people file {path} line {number}: the count says {count} names but "
                f"{len(block)} follow"
            )
        blocks += 1
        position += 1 + int(count)
    if blocks != expected_blocks:
        raise ValueError(
            f"people file {path}: its first line says {expected_blocks} blocks of names, the "
            f"file has {blocks}"
        )
    return names


def _listed(names: list[str], available: set[str], path: str, role: str) -> set[str]:
    missing = [name for name in names if name not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{role} {path} names {missing[0]!r}{more}, which has no folder in the image folder"
        )
    return set(names)


def list_image_folder(
    root: str,
    *,
    people_file: str | None = None,
    exclude_people_file: str | None = None,
    min_images_per_identity: int = 1,
) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, labelled identity names) of a folder-per-identity tree, sorted.

    ``labels[i]`` indexes the names, or is -1 (``UNLABELLED``) for an image of an identity
    with fewer than ``min_images_per_identity`` images. The module doc says what the people
    files do.
    """
    paths, labels, identities, _ = _listing(
        root, people_file, exclude_people_file, min_images_per_identity
    )
    return paths, labels, identities


def _listing(root, people_file, exclude_people_file, min_images_per_identity):
    """list_image_folder's result plus a Counter of the files left out, by extension."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    if min_images_per_identity < 1:
        raise ValueError(
            f"config.data.min_images_per_identity={min_images_per_identity} must be >= 1"
        )
    identities = sorted(
        name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))
    )
    if not identities:
        raise ValueError(f"image folder {root} has no identity sub-folders")
    kept = set(identities)
    if people_file:
        kept = _listed(read_people_file(people_file), kept, people_file, "people file")
    if exclude_people_file:
        names = read_people_file(exclude_people_file)
        kept -= _listed(names, set(identities), exclude_people_file, "exclusion people file")
    if not kept:
        raise ValueError(f"no identity of image folder {root} is left after the people files")
    files_of, ignored = {}, collections.Counter()
    for name in sorted(kept):
        folder = os.path.join(root, name)
        files = []
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                files.append(file)
            elif not file.startswith("."):  # .DS_Store and the like are no one's images
                ignored[os.path.splitext(file)[1].lower() or file] += 1
        if not files:
            raise ValueError(f"identity folder {folder} holds no images {IMAGE_EXTENSIONS}")
        files_of[name] = files
    labelled = [name for name, files in files_of.items() if len(files) >= min_images_per_identity]
    label_of = {name: label for label, name in enumerate(labelled)}
    paths, labels = [], []
    for name, files in files_of.items():
        paths += [os.path.join(root, name, file) for file in files]
        labels += [label_of.get(name, UNLABELLED)] * len(files)
    return paths, labels, labelled, ignored


class ImageFolderSource:
    """Random-access source over ``root/<identity>/<image>``: encoded bytes read on demand.

    Record ``i`` is ``{"image": encoded bytes, "label": int (-1: no class), "key": path}``.
    ``identities`` are the labelled identities (label k is ``identities[k]``);
    ``num_unlabelled_images`` counts the images of the identities with too few images.
    """

    def __init__(
        self,
        root: str,
        *,
        people_file: str | None = None,
        exclude_people_file: str | None = None,
        min_images_per_identity: int = 1,
    ):
        self.root = root
        paths, labels, self.identities, self.ignored_files = _listing(
            root, people_file, exclude_people_file, min_images_per_identity
        )
        self._paths = np.array(paths)
        self._labels = np.array(labels, np.int64)

    @property
    def num_images(self) -> int:
        return len(self._paths)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    @property
    def num_unlabelled_images(self) -> int:
        return int(np.sum(self._labels == UNLABELLED))

    @property
    def paths(self) -> list[str]:
        return self._paths.tolist()

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
        unlabelled = self.num_unlabelled_images
        return (
            f"ImageFolderSource({self.root!r}, num_images={self.num_images}, "
            f"num_classes={self.num_classes}"
            + (f", unlabelled_images={unlabelled}" if unlabelled else "")
            + ")"
        )


@dataclasses.dataclass
class ImageCheck:
    """What ``check_images`` found: the bad files and what decoding will do to the good ones."""

    num_images: int
    bad: list[tuple[str, str]]  # (path, why), in path order
    conversions: collections.Counter  # "greyscale", "16-bit", ... -> images
    converted: int  # images that took at least one conversion
    resized: int  # images whose size is not the model's
    sizes: collections.Counter  # (height, width) of the resized ones
    seconds: float

    def summary(self, image_size: int | None) -> str:
        """One line: the bad count, the conversions and the resizing."""
        parts = [f"{len(self.bad)} undecodable" if self.bad else "all decode"]
        if self.converted:
            kinds = ", ".join(f"{kind} {n}" for kind, n in self.conversions.most_common())
            parts.append(f"{self.converted} converted to 8-bit RGB ({kinds})")
        else:
            parts.append("all 8-bit RGB")
        if self.resized:
            common = ", ".join(f"{h}x{w}: {n}" for (h, w), n in self.sizes.most_common(3))
            more = ", ..." if len(self.sizes) > 3 else ""
            parts.append(f"{self.resized} resized to {image_size}x{image_size} ({common}{more})")
        elif image_size:
            parts.append(f"all {image_size}x{image_size}")
        return "; ".join(parts)


def _check_one(path: str):
    """(None, conversions, (h, w)) for an image that decodes, (why, None, None) otherwise."""
    from facemoe_jax.data.pipeline import decode_image_converting  # imports grain

    try:
        with open(path, "rb") as f:
            image, conversions = decode_image_converting(f.read(), key=path)
    except (BadRecordError, OSError) as e:
        why = str(e)
        if path.lower().endswith(".jp2"):
            why += " (does this OpenCV build decode JPEG 2000?)"
        return why, None, None
    return None, conversions, image.shape[:2]


def check_images(
    paths: list[str], image_size: int | None, workers: int | None = None, label: str = ""
) -> ImageCheck:
    """Decodes every image once (threads: OpenCV releases the GIL), as training will.

    Shows progress with an ETA for long checks (``facemoe_jax.progress``); its final line
    gives ``ImageCheck.summary``.
    """
    from facemoe_jax.data import pipeline  # noqa: F401  (imported before the clock starts)
    from facemoe_jax.core.progress import Progress

    start = time.perf_counter()
    bad, conversions, sizes = [], collections.Counter(), collections.Counter()
    converted = resized = 0
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPool(workers) as pool, Progress(label or "check images", len(paths)) as progress:
        for path, (why, kinds, shape) in zip(paths, pool.imap(_check_one, paths, chunksize=16)):
            progress.update()
            if why is not None:
                bad.append((path, why))
                continue
            conversions.update(kinds)
            converted += bool(kinds)
            if image_size is not None and shape != (image_size, image_size):
                resized += 1
                sizes[shape] += 1
        found = ImageCheck(
            num_images=len(paths),
            bad=bad,
            conversions=conversions,
            converted=converted,
            resized=resized,
            sizes=sizes,
            seconds=time.perf_counter() - start,
        )
        progress.note = found.summary(image_size)  # the final progress line says it once
    return found
