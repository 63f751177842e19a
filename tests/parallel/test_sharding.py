"""Sharding rules as data: which spec each state path gets, and the errors for misfits."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from facemoe_jax.core import defaults
from facemoe_jax.losses import classifier
from facemoe_jax.parallel import sharding

RULES = defaults.get_base_config().sharding_rules
EXPERT_PATH = "opt_state/1/0/mu/encoder/block_1/mlp/experts/fc1_kernel"


def test_default_rules_split_experts_and_class_centres_only():
    rules = RULES
    assert sharding.spec_for("params/encoder/block_1/mlp/experts/fc2_bias", rules) == P("expert")
    assert sharding.spec_for(EXPERT_PATH, rules) == P("expert")  # optimiser moments follow
    assert sharding.spec_for("params/classifier/centers", rules) == P(("data", "expert"))
    assert sharding.spec_for("params/encoder/block_1/mlp/router/gate/kernel", rules) == P()
    assert sharding.class_axes(rules) == ("data", "expert")
    assert sharding.class_axes(()) == ()


def test_per_class_statistics_split_as_the_class_centres():
    """An objective's per-class statistics (a "per_class" key in TrainState.aux) have one row per
    centre row and follow the centres' class axes, whatever the rules call them."""
    per_class = {
        "mean": jax.ShapeDtypeStruct((16, 4), np.float32),
        "count": jax.ShapeDtypeStruct((16,), np.float32),
    }
    abstract = {"aux": {"quality": {"per_class": per_class}}}
    mesh = AbstractMesh((2, 4), ("data", "expert"))
    cases = (
        (RULES, ("data", "expert")),
        ((("classifier/centers$", ("expert",)),), ("expert",)),
        ((), None),
    )
    for rules, axes in cases:
        specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(abstract, mesh, rules))
        assert specs == {"aux": {"quality": {"per_class": {"mean": P(axes), "count": P(axes)}}}}


def test_first_matching_rule_wins_and_specs_are_validated():
    rules = (("experts/fc1", (None, "expert")), ("experts/", ("expert",)))
    assert sharding.spec_for(EXPERT_PATH, rules) == P(None, "expert")
    with pytest.raises(ValueError, match="one entry per array dimension"):
        sharding.partition_spec("expert")
    with pytest.raises(ValueError, match="not an axis name"):
        sharding.partition_spec((3,))


def test_path_names_of_a_state_tree():
    tree = {"params": {"classifier": {"centers": np.zeros((4, 2))}}, "opt": (np.zeros(3),)}
    names = [sharding.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert names == ["opt/0", "params/classifier/centers"]


@pytest.mark.parametrize(
    "shape, spec, message",
    [
        ((6, 4, 8), P("expert"), "dimension 0 of size 6 cannot be split over 4 devices"),
        ((8,), P(None, "expert"), "more entries than"),
        ((8, 4), P("model"), "names mesh axes \\['model'\\]"),
    ],
)
def test_misfits_name_the_array_and_the_sizes(shape, spec, message):
    mesh = AbstractMesh((2, 4), ("data", "expert"))
    with pytest.raises(ValueError, match=message):
        sharding._checked("params/x/experts/fc1_kernel", shape, spec, mesh)
    assert sharding._checked("step", (), spec, mesh) == P()  # scalars stay replicated


def _config(num_experts=8, multiple=1024):
    config = defaults.get_base_config()
    config.model.num_experts = num_experts
    config.loss.class_rows_multiple = multiple
    return config


def test_config_errors_speak_in_config_fields():
    mesh = AbstractMesh((2, 4), ("data", "expert"))
    sharding.check_config(_config(), mesh)
    with pytest.raises(ValueError, match="num_experts=6 cannot be split over config.mesh.expert=4"):
        sharding.check_config(_config(num_experts=6), mesh)
    with pytest.raises(ValueError, match="class_rows_multiple=12 is not a multiple of the 8"):
        sharding.check_config(_config(multiple=12), mesh)
    dense = _config(num_experts=6)
    dense.model.moe_layers = "none"  # no experts to split: any expert axis is fine
    sharding.check_config(dense, mesh)


def test_class_rows_are_padded_to_the_multiple_with_zero_rows():
    assert classifier.padded_num_classes(205_990, 1024) == 206_848
    assert classifier.padded_num_classes(1024, 1024) == 1024
    centers = classifier.init_class_centers(jax.random.PRNGKey(0), 5, 3, num_rows=8)
    assert centers.shape == (8, 3) and not np.any(np.asarray(centers[5:]))
    with pytest.raises(ValueError, match="class_rows_multiple=0"):
        classifier.padded_num_classes(10, 0)
