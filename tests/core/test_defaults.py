"""upgrade(): a config saved by an earlier run becomes a full config of today's code."""

import json
import os

import ml_collections

from facemoe_jax.core import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Read only: tests/train/test_resume_old_checkpoint.py resumes this checkpoint.
SAVED_DEMO = os.path.join(
    ROOT, "tests/e2e/data/checkpoint_before_objectives/demo/checkpoints/2/config/metadata"
)


def _saved_demo() -> dict:
    with open(SAVED_DEMO) as f:
        return json.load(f)


def test_configs_common_is_the_package_builder():
    from configs import common

    assert common.get_base_config is defaults.get_base_config
    assert common.low_resolution_eval is defaults.low_resolution_eval


def test_missing_field_is_filled_with_the_default():
    saved = defaults.get_base_config().to_dict()
    del saved["eval"]["lfw_dir"], saved["data"]["synthetic_identities"]
    config = defaults.upgrade(saved)
    assert config.eval.lfw_dir == ""
    assert config.data.synthetic_identities == 1000
    assert "lfw_dir" not in saved["eval"]  # the argument is not modified


def test_saved_values_win():
    config = defaults.upgrade({"seed": 7, "model": {"name": "iresnet", "depth": 50}})
    assert (config.seed, config.model.name, config.model.depth) == (7, "iresnet", 50)
    assert config.model.lora.rank == 0  # a section the saved config lacks entirely
    assert config.train.num_steps == defaults.get_base_config().train.num_steps


def test_nested_sections():
    saved = {"model": {"lora": {"rank": 8}}, "mine": {"a": {"b": 1}}, "loss": {"old_knob": 2}}
    config = defaults.upgrade(ml_collections.ConfigDict(saved))
    assert config.model.lora.rank == 8
    assert config.model.lora.where == "qkv"
    assert config.mine.a.b == 1  # a section only the saved config has is kept
    assert config.loss.old_knob == 2 and config.loss.scale == 64.0


def test_fields_that_predate_their_default_keep_the_old_behaviour():
    saved = defaults.get_base_config().to_dict()
    del saved["model"]["quality_head_input"], saved["recognizability"]["quality_target"]
    config = defaults.upgrade(saved)
    assert config.model.quality_head_input == "embedding"
    assert config.recognizability.quality_target == "prototype"
    # quality_ui_weight was the index's ui_weight.
    saved["recognizability"]["ui_weight"] = 0.3
    del saved["recognizability"]["quality_ui_weight"]
    assert defaults.upgrade(saved).recognizability.quality_ui_weight == 0.3
    # A saved value is never replaced by the old behaviour.
    assert defaults.upgrade(
        {"model": {"quality_head_input": "patch"}}
    ).model.quality_head_input == ("patch")


def test_old_tuple_of_trainable_patterns_becomes_the_comma_list():
    config = defaults.upgrade({"train": {"trainable": ["lora", "^classifier/"]}})
    assert config.train.trainable == "lora,^classifier/"


def test_json_round_trip_of_the_base_config_is_the_base_config():
    base = defaults.get_base_config()
    config = defaults.upgrade(json.loads(base.to_json()))
    assert config == base  # tuples (sharding_rules) and the typed export field come back
    config.export.merge_lora_alpha = 0.5  # still a float field


def test_a_real_saved_config():
    saved = _saved_demo()
    config = defaults.upgrade(saved)
    assert config.model.image_size == 32 and config.model.capacity_factor == 1.5
    upgraded = json.loads(config.to_json())

    def kept(saved_part, upgraded_part):
        if isinstance(saved_part, dict):
            return all(kept(v, upgraded_part[k]) for k, v in saved_part.items())
        return saved_part == upgraded_part

    assert kept(json.loads(json.dumps(saved)), upgraded)  # every saved value, as it was saved
    assert config.cross_resolution.weight == 0.0  # a section added after the run: the default
    # The same file as a run older still would have saved it, without two fields.
    del saved["data"]["synthetic_identities"], saved["eval"]["lfw_degrade"]
    config = defaults.upgrade(saved)
    assert config.data.synthetic_identities == 1000 and config.eval.lfw_degrade == "both"
