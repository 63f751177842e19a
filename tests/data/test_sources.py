"""Source selection by config, config/data checks, image folders, decoding."""

import importlib

import cv2
import numpy as np
import pytest

from configs import demo
from facemoe_jax.core import defaults
from facemoe_jax.data import folder, pipeline, recordio, sources


def jpeg_bytes(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def small_config(train: str, num_classes: int, num_images: int = 0):
    config = demo.get_config()
    config.data.update(train=train, num_classes=num_classes, num_images=num_images)
    return config


def test_image_folder_labels_follow_sorted_folder_names(tmp_path):
    for name, count in (("zed", 1), ("amy", 2), ("mo", 1)):
        (tmp_path / name).mkdir()
        for k in range(count):
            (tmp_path / name / f"{k}.png").write_bytes(b"png" + bytes([k]))
    (tmp_path / "stray.jpg").write_bytes(b"not in an identity folder")
    source = folder.ImageFolderSource(str(tmp_path))
    assert source.identities == ["amy", "mo", "zed"]
    assert [source[k]["label"] for k in range(4)] == [0, 0, 1, 2]
    assert source[3]["image"] == b"png\x00" and source[3]["key"].endswith("zed/0.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        folder.ImageFolderSource(str(tmp_path))


def test_config_selects_sources_and_checks_counts(tmp_path):
    images = [jpeg_bytes(np.full((8, 8, 3), v, np.uint8)) for v in range(6)]
    recordio.write_image_pack(str(tmp_path / "train.rec"), images, [0, 0, 1, 1, 2, 2])
    source = sources.train_source(small_config(f"recordio:{tmp_path}", 3, 6))
    assert isinstance(source, recordio.RecordIODataSource) and len(source) == 6
    with pytest.raises(ValueError, match=r"num_classes=4 but 'recordio:.*' has 3 classes"):
        sources.train_source(small_config(f"recordio:{tmp_path}", 4))
    with pytest.raises(ValueError, match=r"num_images=7 but .* has 6 images"):
        sources.train_source(small_config(f"recordio:{tmp_path}", 3, 7))
    with pytest.raises(ValueError, match="'lmdb:/x' is not a known source"):
        sources.train_source(small_config("lmdb:/x", 3))
    with pytest.raises(FileNotFoundError, match="nowhere/train.rec does not exist"):
        sources.train_source(small_config(f"recordio:{tmp_path}/nowhere", 3))
    synthetic = sources.train_source(small_config("synthetic", 5))
    assert synthetic.num_classes == 5


def test_decode_image_converts_to_rgb_and_rejects_corrupt_bytes():
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 200  # red
    decoded = pipeline.decode_image(cv2.imencode(".png", image[..., ::-1])[1].tobytes())
    np.testing.assert_array_equal(decoded, image)
    good = jpeg_bytes(image)
    for bad, reason in [
        (b"", "empty"),
        (good[: len(good) // 2], "truncated JPEG"),
        (b"garbage bytes", "not a decodable image"),
    ]:
        with pytest.raises(recordio.BadRecordError, match=f"k7: {reason}"):
            pipeline.decode_image(bad, "k7")


def make_faces(root, counts: dict) -> str:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            cv2.imwrite(str(root / name / f"{k}.png"), np.full((8, 8, 3), 30 * k, np.uint8))
    return str(root)


def test_class_count_zero_comes_from_the_data_and_a_given_one_must_match(tmp_path):
    faces = make_faces(tmp_path / "faces", {"amy": 2, "bo": 1, "cy": 3})
    config = small_config(f"folder:{faces}", 0)
    source = sources.train_source(config)
    resolved = sources.with_data_counts(config, source)
    assert resolved.data.num_classes == 3 and config.data.num_classes == 0  # a copy
    assert sources.with_data_counts(resolved, source) is resolved
    assert sources.with_data_counts(config).data.num_classes == 3  # opens the folder itself
    config.data.min_images_per_identity = 2  # bo's image stays, without a class
    resolved = sources.with_data_counts(config, sources.train_source(config))
    assert resolved.data.num_classes == 2
    config = small_config(f"folder:{faces}", 3)
    config.data.min_images_per_identity = 2
    with pytest.raises(ValueError, match=r"num_classes=3 but 'folder:.*' has 2 classes \(0 takes"):
        sources.train_source(config)


SHIPPED_CONFIGS = [
    ("demo", None),
    ("aird", None),
    ("recognizability", None),
    ("vit_b_moe", None),
    ("iresnet", "r50"),
    ("petalface", "tinyface"),
    ("petalface", "demo"),
    ("swin_moe_120", "wf4m"),
    ("swin_moe_120", "tinyface_full"),
]


@pytest.mark.parametrize("name, arg", SHIPPED_CONFIGS)
def test_shipped_configs_take_the_class_count_from_the_data(name, arg):
    # A real set on the command line needs no count: every config leaves num_classes at 0 and
    # gives its synthetic stand-in's size as synthetic_identities instead.
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    assert config.data.num_classes == 0
    resolved = sources.with_data_counts(config)  # synthetic: nothing is rendered to count
    assert resolved.data.num_classes == config.data.synthetic_identities > 0


def test_synthetic_identities_resolve_without_training_and_num_classes_still_overrides():
    config = demo.get_config()
    resolved = sources.with_data_counts(config)
    assert resolved.data.num_classes == 1000 and config.data.num_classes == 0  # a copy
    assert sources.train_source(config).num_classes == 1000
    # Old command lines (--config.data.num_classes=N on synthetic data) still mean N identities.
    config.data.num_classes = 20
    assert sources.with_data_counts(config) is config
    assert sources.train_source(config).num_classes == 20
    assert sources.synthetic_identities(config.data) == 20
    old = config.to_dict()  # a config saved before the field, with the class count it needed
    del old["data"]["synthetic_identities"]
    assert sources.synthetic_identities(defaults.upgrade(old).data) == 20


def test_folder_options_are_refused_elsewhere_and_synthetic_data_need_a_count(tmp_path):
    config = small_config("synthetic", 0)
    config.data.synthetic_identities = 0
    with pytest.raises(ValueError, match="synthetic_identities=0 .* need a number of identities"):
        sources.train_source(config)
    config = small_config("synthetic", 5)
    config.data.people_file = "/x/people.txt"
    with pytest.raises(ValueError, match=r"people_file='/x/people.txt' applies to image folders"):
        sources.train_source(config)
    config = small_config(f"recordio:{tmp_path}", 0)
    config.data.min_images_per_identity = 3
    with pytest.raises(ValueError, match="min_images_per_identity=3 applies to image folders"):
        sources.train_source(config)


def test_unlabelled_images_are_refused_with_recognizability(tmp_path):
    faces = make_faces(tmp_path / "faces", {"amy": 2, "bo": 1})
    config = small_config(f"folder:{faces}", 0)
    config.data.min_images_per_identity = 2
    config.recognizability.enabled = True
    with pytest.raises(ValueError, match="recognizability.enabled needs a class for every image"):
        sources.train_source(config)
    # Without the diversion loss, the "agreement" target leaves bo's image out of its loss.
    config.recognizability.update(diversion_weight=0.0, quality_target="agreement")
    assert sources.train_source(config).num_unlabelled_images == 1
    config.recognizability.quality_target = "own_full"
    with pytest.raises(ValueError, match="its quality target 'own_full'"):
        sources.train_source(config)
    config.data.min_images_per_identity = 3
    config.recognizability.enabled = False
    with pytest.raises(ValueError, match="no labelled identity"):
        sources.train_source(config)


def test_undecodable_images_stop_before_compiling_naming_files_and_the_way_out(tmp_path, capfd):
    faces = make_faces(tmp_path / "faces", {"amy": 3, "bo": 3})
    (tmp_path / "faces" / "bo" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    (tmp_path / "faces" / "amy" / "notes.txt").write_text("x")
    config = small_config(f"folder:{faces}", 0)
    config.data.max_bad_share = 0.1
    with pytest.raises(pipeline.BadDataError) as error:
        sources.check_images(sources.train_source(config), config)
    message = str(error.value)
    assert "1 of the 6 images of 'folder:" in message and "max_bad_share=0.1" in message
    assert f"{faces}/bo/2.png: truncated PNG" in message
    assert f"python -m facemoe_jax.data.pack --images {faces} --out OUT" in message
    assert "\n" not in message
    err = capfd.readouterr().err
    assert "warning: 1 file in the identity folders" in err and ".txt 1" in err
    config.data.max_bad_share = 0.2  # within the share: a warning, training skips it
    found = sources.check_images(sources.train_source(config), config)
    assert len(found.bad) == 1 and found.resized == 5  # the good 8x8 images, to the model size
    captured = capfd.readouterr()
    assert "warning: 1 of the 6 images do not decode (within" in captured.err
    assert "check images of folder:" in captured.out and "5 resized to" in captured.out
    assert sources.check_images(sources.train_source(small_config("synthetic", 5)), config) is None
