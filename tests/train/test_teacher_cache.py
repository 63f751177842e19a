"""The cached teacher embeddings: the table against a per-image computation, the key, reuse,
the pipeline's record index, and the cached distillation target in the step and in a run."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from facemoe_jax.core.images import normalize_images
from facemoe_jax.data import pipeline
from facemoe_jax.interop.load import load_variables
from facemoe_jax.models import build_model
from facemoe_jax.parallel import mesh as mesh_lib
from facemoe_jax.train import objectives, teacher_cache
from facemoe_jax.train.objectives.distill import DistillObjective, teacher_embeddings
from tests.train.objectives.test_distill import student_config, teacher_config, teacher_run  # noqa: F401


class ArraySource:
    """Random access over in-memory uint8 images, labels k % 3."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": index % 3, "key": f"img{index}"}

    def __repr__(self):  # the same name for any length: record i of two sources is one record
        return "ArraySource"


def _images(count, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


@pytest.fixture(scope="module")
def teacher(teacher_run):  # noqa: F811
    loaded = load_variables(teacher_run[0])
    model = build_model(loaded.config.model)
    return model, {
        "params": loaded.variables["params"],
        "batch_stats": loaded.variables["batch_stats"],
    }


def test_table_is_the_normalised_sum_of_each_image_and_its_mirror(teacher):
    model, variables = teacher
    images = _images(5)
    embed = lambda v, x: model.apply(v, x, train=False)[0]  # noqa: E731
    table = teacher_cache.embed_records(
        embed, variables, ArraySource(images), [0, 1, 2, 3, 4], 32, batch_size=2
    )
    for i, image in enumerate(images):
        pair = np.stack([image, image[:, ::-1]])
        raw = np.asarray(embed(variables, normalize_images(pair)), np.float64).sum(axis=0)
        np.testing.assert_allclose(table[i], raw / np.linalg.norm(raw), atol=2e-6)


def test_an_unreadable_record_gets_a_zero_row_and_the_rest_their_own(teacher):
    from facemoe_jax.data.pipeline import BadRecordError

    class WithABadRecord(ArraySource):
        def __getitem__(self, index):
            if index == 1:
                raise BadRecordError("img1: truncated")
            return super().__getitem__(index)

    model, variables = teacher
    embed = lambda v, x: model.apply(v, x, train=False)[0]  # noqa: E731
    images = _images(3)
    table = teacher_cache.embed_records(embed, variables, WithABadRecord(images), [0, 1, 2], 32)
    direct = teacher_cache.embed_records(embed, variables, ArraySource(images), [0, 2], 32)
    np.testing.assert_array_equal(table[1], 0.0)
    np.testing.assert_allclose(table[[0, 2]], direct, atol=1e-6)


def test_file_follows_the_teacher_and_grows_with_new_records(teacher, tmp_path, capsys):
    model, variables = teacher
    key = teacher_cache.teacher_key(variables, 32)
    assert key != teacher_cache.teacher_key(variables, 48)
    assert key != teacher_cache.teacher_key(jax.tree.map(lambda x: x + 1e-3, variables), 32)
    embed = lambda v, x: model.apply(v, x, train=False)[0]  # noqa: E731
    images = _images(5)
    four, five = ArraySource(images[:4]), ArraySource(images)
    built = teacher_cache.load_or_build(embed, variables, 32, four, str(tmp_path), "t")
    assert "embedded 4 of 4 records" in capsys.readouterr().out
    read = teacher_cache.load_or_build(embed, variables, 32, four, str(tmp_path), "t")
    assert "4 records read from" in capsys.readouterr().out
    np.testing.assert_array_equal(built, read)
    grown = teacher_cache.load_or_build(embed, variables, 32, five, str(tmp_path), "t")
    assert "embedded 1 of 5 records" in capsys.readouterr().out
    np.testing.assert_array_equal(grown[:4], built)
    direct = teacher_cache.embed_records(embed, variables, five, [4], 32)
    np.testing.assert_allclose(grown[4], direct[0], atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.npz"]


def test_record_names_change_with_the_file(tmp_path):
    from facemoe_jax.data.folder import ImageFolderSource
    import cv2

    (tmp_path / "a").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "a" / f"a_{i:04d}.jpg"), _images(1, 8, seed=i)[0])
    source = ImageFolderSource(str(tmp_path))
    before = teacher_cache.record_names(source)
    assert before[0].startswith(str(tmp_path / "a" / "a_0000.jpg") + "|")
    cv2.imwrite(str(tmp_path / "a" / "a_0000.jpg"), _images(1, 16, seed=9)[0])
    after = teacher_cache.record_names(source)
    assert after[0] != before[0] and after[1] == before[1]


def test_auto_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FACEMOE_CACHE_DIR", str(tmp_path))
    assert teacher_cache.cache_dir("auto") == str(tmp_path / "teacher_embeddings")
    assert teacher_cache.cache_dir("/x/y") == "/x/y"


def test_pipeline_record_index_names_each_image_source_record():
    images = _images(12, size=8)
    source = ArraySource(images)
    it = pipeline.train_iterator(
        source, global_batch_size=4, seed=3, shard_index=0, shard_count=1, record_index=True
    )
    seen = []
    for _ in range(6):  # two epochs
        batch = next(it)
        for image, label, record in zip(batch["image"], batch["label"], batch["record"]):
            np.testing.assert_array_equal(image, images[record])
            assert label == record % 3
            seen.append(int(record))
    assert sorted(seen[:12]) == list(range(12)) == sorted(seen[12:])
    plain = next(
        pipeline.train_iterator(source, global_batch_size=4, seed=3, shard_count=1, shard_index=0)
    )
    assert "record" not in plain


def test_cache_refuses_crops(teacher_run):  # noqa: F811
    config = student_config(teacher_run[0], instance_weight=1.0, teacher_cache="auto")
    config.data.crop_prob = 0.2
    with pytest.raises(ValueError, match="teacher_cache='auto'.*crop_prob=0.2"):
        DistillObjective.check_config(config)


def test_cached_target_is_the_table_row_of_each_record(teacher_run, tmp_path):  # noqa: F811
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "expert": 1}))
    images = _images(6)
    source = ArraySource(images)
    config = student_config(
        teacher_run[0], instance_weight=1.0, teacher_cache=str(tmp_path / "cache")
    )
    objective = DistillObjective(config, objectives.Resources(mesh, load_variables, source))
    assert objective.batch_keys == ("record",)
    assert "cached per record" in objective.describe()
    table = np.asarray(objective.frozen()["table"])
    # The in-step teacher's flip-test embedding of the same undegraded image.
    plain = DistillObjective(
        student_config(teacher_run[0], instance_weight=1.0),
        objectives.Resources(mesh, load_variables),
    )
    x = np.stack([images[4], images[4][:, ::-1]])
    both = np.asarray(teacher_embeddings(plain.teacher, plain.frozen(), x)).sum(axis=0)
    np.testing.assert_allclose(table[4], both / np.linalg.norm(both), atol=2e-6)
    with pytest.raises(ValueError, match="without its training source"):
        DistillObjective(config, objectives.Resources(mesh, load_variables))


@pytest.mark.slow
def test_run_with_cached_teacher_end_to_end(teacher_run, tmp_path, capsys):  # noqa: F811
    from facemoe_jax.pipelines import train_and_evaluate

    config = student_config(
        teacher_run[0],
        instance_weight=1.0,
        relation_weight=10.0,
        teacher_cache=str(tmp_path / "cache"),
    )
    config.data.update(train="synthetic_lr", num_classes=8, synthetic_images_per_identity=4)
    config.train.update(num_steps=2, batch_size=8, log_every_steps=1)
    config.checkpoint.every_steps = 2
    config.eval.update(synthetic_pairs=0, synthetic_tinyface_identities=0, routing_map_faces=0)
    train_and_evaluate(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "embedded 32 of 32 records" in out and "cached per record" in out
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(m["train/distill_instance"] > 0 for m in logged)
    train_and_evaluate(config, str(tmp_path / "run2"))  # the same teacher and data: reused
    assert "32 records read from" in capsys.readouterr().out
