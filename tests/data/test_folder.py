"""Image folders: people files, identity selection and labels, the image pre-check, and the
folder source on real LFW identities."""

import os

import cv2
import numpy as np
import pytest

from facemoe_jax.data import folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LFW = os.path.join(os.path.dirname(ROOT), "shared", "realfaces", "lfw")
needs_lfw = pytest.mark.skipif(
    not os.path.isdir(os.path.join(LFW, "aligned112")),
    reason="no real faces: ../shared/realfaces/lfw/aligned112 is absent (a user's clone)",
)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def make_folder(root, counts: dict, size: int = 8, ext: str = ".png") -> str:
    """root/<name>/<k><ext>, `counts[name]` images each, every image a flat grey."""
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            cv2.imwrite(str(root / name / f"{k}{ext}"), np.full((size, size, 3), k, np.uint8))
    return str(root)


def test_people_files_in_lfw_folds_and_plain_formats(tmp_path):
    lfw = write(tmp_path / "dev.txt", "3\nAmy\t2\nBo_Li\t1\nCy\t4\n")
    assert folder.read_people_file(lfw) == ["Amy", "Bo_Li", "Cy"]
    folds = write(tmp_path / "people.txt", "2\n2\nAmy\t2\nBo_Li\t1\n1\nCy\t4\n")
    assert folder.read_people_file(folds) == ["Amy", "Bo_Li", "Cy"]
    plain = write(tmp_path / "ids.txt", "0000045\n\n0000099\n")  # numeric names are names
    assert folder.read_people_file(plain) == ["0000045", "0000099"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("4\nAmy\t2\nBo\t1\nCy\t4\n", "line 1: the count says 4 names but 3 follow"),
        ("2\nAmy\t2\nBo\t1\nCy\t4\n", "line 4: 'Cy\\t4' where a count line was expected"),
        ("2\nAmy\t2\nBo\n", "line 3: 'Bo' is not 'Name<TAB>images'"),
        ("3\n1\nAmy\t2\n1\nBo\t1\n", "first line says 3 blocks of names, the file has 2"),
        ("Amy\nBo\nAmy\n", "lists 'Amy' more than once"),
    ],
)
def test_people_file_mistakes_name_the_file_and_line(tmp_path, text, fragment):
    path = write(tmp_path / "people.txt", text)
    with pytest.raises(ValueError, match="people file .*people.txt") as error:
        folder.read_people_file(path)
    assert fragment in str(error.value)


def test_people_lists_keep_and_drop_identities_labels_follow_the_kept_names(tmp_path):
    root = make_folder(tmp_path / "faces", {"zed": 1, "amy": 2, "mo": 1, "kai": 3})
    keep = write(tmp_path / "keep.txt", "zed\nmo\nkai\n")
    source = folder.ImageFolderSource(root, people_file=keep)
    assert source.identities == ["kai", "mo", "zed"] and source.num_classes == 3
    assert [source[k]["label"] for k in range(len(source))] == [0, 0, 0, 1, 2]
    drop = write(tmp_path / "drop.txt", "1\nkai\t3\n")
    source = folder.ImageFolderSource(root, people_file=keep, exclude_people_file=drop)
    assert source.identities == ["mo", "zed"] and len(source) == 2
    assert source[1]["key"].endswith(os.path.join("zed", "0.png"))
    source = folder.ImageFolderSource(root, exclude_people_file=drop)
    assert source.identities == ["amy", "mo", "zed"]


def test_a_listed_name_without_a_folder_is_an_error_naming_name_and_file(tmp_path):
    root = make_folder(tmp_path / "faces", {"amy": 1, "mo": 1})
    keep = write(tmp_path / "keep.txt", "2\namy\t1\nNoa_Ng\t5\n")
    with pytest.raises(ValueError, match=r"people file .*keep.txt names 'Noa_Ng'"):
        folder.ImageFolderSource(root, people_file=keep)
    drop = write(tmp_path / "drop.txt", "Ro\n")
    with pytest.raises(ValueError, match=r"exclusion people file .*drop.txt names 'Ro'"):
        folder.ImageFolderSource(root, exclude_people_file=drop)
    with pytest.raises(ValueError, match="no identity .* is left"):
        folder.ImageFolderSource(root, exclude_people_file=write(tmp_path / "all", "amy\nmo\n"))


def test_small_identities_stay_in_the_data_without_a_class(tmp_path):
    root = make_folder(tmp_path / "faces", {"amy": 3, "bo": 1, "cy": 2, "di": 1})
    source = folder.ImageFolderSource(root, min_images_per_identity=2)
    assert source.identities == ["amy", "cy"] and source.num_classes == 2
    labels = [source[k]["label"] for k in range(len(source))]
    assert labels == [0, 0, 0, -1, 1, 1, -1]  # amy x3, bo, cy x2, di: every image kept
    assert source.num_unlabelled_images == 2 and "unlabelled_images=2" in repr(source)
    with pytest.raises(ValueError, match="min_images_per_identity=0 must be >= 1"):
        folder.ImageFolderSource(root, min_images_per_identity=0)


def test_new_extensions_are_images_and_other_files_are_counted(tmp_path):
    root = tmp_path / "faces"
    (root / "amy").mkdir(parents=True)
    grey = np.full((8, 8), 90, np.uint8)
    for ext in (".pgm", ".tif", ".tiff", ".pbm"):
        cv2.imwrite(str(root / "amy" / f"a{ext}"), grey)
    cv2.imwrite(str(root / "amy" / "b.ppm"), np.dstack([grey] * 3))
    (root / "amy" / "notes.txt").write_text("not an image")
    (root / "amy" / ".DS_Store").write_bytes(b"")
    source = folder.ImageFolderSource(str(root))
    assert len(source) == 5 and source.ignored_files == {".txt": 1}


def test_check_images_counts_conversions_resizing_and_names_bad_files(tmp_path):
    root = tmp_path / "faces"
    (root / "amy").mkdir(parents=True)
    colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "amy" / "colour.png"), colour)
    cv2.imwrite(str(root / "amy" / "grey.png"), colour[..., 0])
    cv2.imwrite(str(root / "amy" / "deep.png"), colour.astype(np.uint16) * 257)
    cv2.imwrite(str(root / "amy" / "alpha.png"), np.dstack([colour, colour[..., :1]]))
    cv2.imwrite(str(root / "amy" / "large.png"), np.zeros((20, 24, 3), np.uint8))
    good = cv2.imencode(".jpg", colour)[1].tobytes()
    (root / "amy" / "cut.jpg").write_bytes(good[: len(good) // 2])
    paths = folder.ImageFolderSource(str(root)).paths
    found = folder.check_images(paths, 16, workers=2)
    assert found.num_images == 6 and found.converted == 3 and found.resized == 1
    assert found.conversions == {"greyscale": 1, "16-bit": 1, "alpha": 1}
    assert found.sizes == {(20, 24): 1}
    assert [(os.path.basename(p), why.split(": ")[-1]) for p, why in found.bad] == [
        ("cut.jpg", "truncated JPEG (no end-of-image marker)")
    ]
    summary = found.summary(16)
    assert summary.startswith("1 undecodable; 3 converted to 8-bit RGB (") and "20x24: 1" in summary


@needs_lfw
def test_folder_source_on_real_lfw_identities_with_a_people_file(tmp_path):
    images = os.path.join(LFW, "aligned112")
    names = ["Zico", "Aaron_Peirsol", "Abdullah_Gul"]
    people = write(tmp_path / "people.txt", "3\n" + "".join(f"{n}\t1\n" for n in names))
    source = folder.ImageFolderSource(images, people_file=people, min_images_per_identity=4)
    # Labels in sorted name order; counts from the folders themselves.
    counts = {n: len(os.listdir(os.path.join(images, n))) for n in sorted(names)}
    labelled = [n for n in sorted(names) if counts[n] >= 4]
    assert source.identities == labelled and len(source) == sum(counts.values())
    expected = [labelled.index(n) if n in labelled else -1 for n in sorted(names)]
    labels = [source[k]["label"] for k in range(len(source))]
    assert labels == [label for n, label in zip(sorted(names), expected) for _ in range(counts[n])]
    found = folder.check_images(source.paths, 112, workers=2)
    assert not found.bad and found.converted == 0 and found.resized == 0


@needs_lfw
def test_lfw_view_one_people_files_read_and_split_the_folder(tmp_path):
    train = folder.read_people_file(os.path.join(LFW, "peopleDevTrain.txt"))
    test = folder.read_people_file(os.path.join(LFW, "peopleDevTest.txt"))
    view2 = folder.read_people_file(os.path.join(LFW, "people.txt"))
    assert (len(train), len(test), len(view2)) == (4038, 1711, 5749)
    assert not set(train) & set(test)
    identities = sorted(os.listdir(os.path.join(LFW, "aligned112")))
    assert sorted(train + test) == identities == sorted(view2)
