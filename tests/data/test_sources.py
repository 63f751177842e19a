"""Source selection by config, config/data checks, image folders, decoding."""

import cv2
import numpy as np
import pytest

from configs import demo
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
