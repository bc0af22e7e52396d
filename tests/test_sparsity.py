"""Rules, plans and stage schedules."""

import jax
import jax.numpy as jnp
import pytest

import admmprune as ap
from admmprune.sparsity import SPEC_TYPES


def params():
    return {
        "conv1": {"kernel": jnp.zeros((3, 3, 1, 8)), "bias": jnp.zeros(8)},
        "bn": {"scale": jnp.zeros(8), "bias": jnp.zeros(8), "mean": jnp.zeros(8), "var": jnp.zeros(8)},
        "fc": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)},
        "head": {"kernel": jnp.zeros((16, 10)), "bias": jnp.zeros(10)},
    }


def test_default_rules_prune_kernels_only_and_never_the_output_layer():
    specs = ap.resolve(params())
    assert specs["conv1"]["kernel"] == ap.Filter()
    assert specs["fc"]["kernel"] == ap.Filter()
    assert specs["head"]["kernel"] is None
    assert all(s is None for s in jax.tree.leaves(specs["bn"], is_leaf=lambda x: x is None))
    assert specs["conv1"]["bias"] is None and specs["fc"]["bias"] is None


def test_default_rules_with_a_named_output_layer():
    p = {"fc1": {"kernel": jnp.zeros((4, 5))}, "fc2": {"kernel": jnp.zeros((5, 2))}}
    specs = ap.resolve(p, ap.default_rules(output="fc2"))
    assert specs == {"fc1": {"kernel": ap.Filter()}, "fc2": {"kernel": None}}


def test_first_matching_rule_wins():
    rules = [(r"conv1/kernel", ap.Column()), (r"kernel$", ap.NofM(2, 4)), (r"bias", ap.Unstructured())]
    specs = ap.resolve(params(), rules)
    assert specs["conv1"]["kernel"] == ap.Column()
    assert specs["fc"]["kernel"] == ap.NofM(2, 4)
    assert specs["head"]["bias"] == ap.Unstructured()


def test_a_spec_that_does_not_fit_is_rejected_with_its_path():
    with pytest.raises(ValueError, match="conv1/kernel.*repeat=3"):
        ap.resolve(params(), [("conv1/kernel", ap.Filter(repeat=3))])
    with pytest.raises(ValueError, match="fc/bias.*Column"):
        ap.resolve(params(), [("fc/bias", ap.Column())])
    with pytest.raises(ValueError, match="n <= m"):
        ap.resolve(params(), [("fc/kernel", ap.NofM(5, 4))])
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        ap.resolve(params(), [("fc/kernel", ap.Channel(axis=3))])


def test_specs_are_pytree_leaves_and_hashable():
    for spec in (ap.Unstructured(), ap.Filter(), ap.Channel(), ap.Column(), ap.NofM(2, 4), ap.Block((2, 2))):
        assert isinstance(spec, SPEC_TYPES)
        assert jax.tree.leaves([spec]) == [spec]
        hash(spec)
    with pytest.raises(ValueError, match="group"):
        ap.Coupled((ap.Filter(),))


def test_plan_lists_every_parameter():
    p = params()
    plan = ap.format_plan(p, ap.resolve(p))
    lines = plan.splitlines()
    assert len(lines) == 1 + len(jax.tree.leaves(p))
    assert any(line.startswith("conv1/kernel") and "3x3x1x8" in line and line.endswith("8") for line in lines)
    assert any(line.startswith("head/kernel") and "not pruned" in line for line in lines)


@pytest.mark.parametrize(
    "target,expected",
    [
        (0.9, (0.5, 0.75, 0.9)),
        (0.7, (0.5, 0.7)),
        (0.5, (0.5,)),
        (0.3, (0.3,)),
        (0.99, (0.5, 0.75, 0.875, 0.9375, 0.99)),
    ],
)
def test_default_stages(target, expected):
    assert ap.stage_ratios(target) == pytest.approx(expected)


@pytest.mark.parametrize(
    "target,stages,match",
    [
        (1.0, None, r"in \(0, 1\)"),
        (0.0, None, r"in \(0, 1\)"),
        (0.9, [0.5, 0.5, 0.9], "strictly increasing"),
        (0.9, [0.5, 0.75], "must equal"),
        (0.9, [-0.1, 0.9], r"in \(0, 1\)"),
        (0.9, [], r"in \(0, 1\)"),
    ],
)
def test_bad_stages(target, stages, match):
    with pytest.raises(ValueError, match=match):
        ap.stage_ratios(target, stages)


def test_explicit_stages():
    assert ap.stage_ratios(0.9, [0.3, 0.6, 0.9]) == (0.3, 0.6, 0.9)
