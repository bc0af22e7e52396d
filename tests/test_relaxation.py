"""The continuous relaxation of channel gates beyond classification: U-Net segmentation,
and residual branches whose gates all close (issue 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from admmprune import collapse, costs, discovery, gates, methods, models, pipeline
from admmprune.configs import default


def relaxation(ratio, **overrides):
    """The relaxation method as the pipeline builds it from a config."""
    config = default.get_config()
    config.prune.method = "relaxation"
    config.prune.ratio = ratio
    for key, value in overrides.items():
        config.relaxation[key] = value
    return pipeline.settings(config).method


def segmentation_batch(rng, n=8, size=16):
    """Images whose per-pixel class is a fixed function of the pixel: learnable, not random."""
    x = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    labels = np.argmax(x @ np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]], np.float32), -1)
    return jnp.asarray(x), jnp.asarray(labels.astype(np.int32))


def test_relaxation_prunes_and_collapses_a_unet_for_segmentation():
    model = models.get("unet", base=4, depth=2, in_shape=(16, 16, 3), num_classes=3, rngs=nnx.Rngs(0))
    x, labels = segmentation_batch(np.random.default_rng(0))
    found = discovery.discover_nnx(model, x)
    specs = found.specs
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    method = relaxation(0.5, gate_learning_rate=0.2, flops_weight=5.0, polarization_weight=0.5)
    macs = costs.layer_macs(model, x[:1])
    unet = methods.Target(
        model_name="unet", specs=specs, layer_macs=lambda: macs, removable_groups=lambda p: set(), taylor_grads=None
    )
    macs_model, target = method.budget(params, unet)
    dense_macs = sum(macs.values())
    assert 0.2 * dense_macs < target < 0.3 * dense_macs  # keeping half of every group: about a quarter

    penalty = method.penalty(params, unet)
    logits = method.init_gates(params, specs)
    tx = optax.multi_transform(
        {"w": optax.sgd(0.05), "g": optax.adam(method.gate_learning_rate)},
        lambda t: (jax.tree.map(lambda _: "w", t[0]), jax.tree.map(lambda _: "g", t[1])),
    )
    state = tx.init((params, logits))

    @jax.jit
    def step(trainable, rest, state):
        def loss(t, rest):
            p = gates.apply(t[0], method.gate_values(t[1]), specs)
            m = nnx.merge(graphdef, p, rest, copy=True)
            out = m(x)  # (B, H, W, classes): per-pixel logits
            ce = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
            return ce + penalty(t[1]), nnx.split(m, nnx.Param, ...)[2]

        (value, rest), g = jax.value_and_grad(loss, has_aux=True)(trainable, rest)
        updates, state = tx.update(g, state, trainable)
        return optax.apply_updates(trainable, updates), rest, state, value

    trainable = (params, logits)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction mixes float and int32
        for _ in range(60):
            trainable, rest, state, _ = step(trainable, rest, state)
    params, logits = trainable
    values = method.gate_values(logits)
    # The budget term pulled the gated compute down to (near) the target.
    assert float(macs_model(values)) < 1.3 * target

    keep = {k: np.asarray(v) >= method.threshold for k, v in values.items()}
    scores = method.scores(params, specs, logits, unet)
    keep = methods.keep_at_least_one(keep, scores, set())
    assert all(k.any() for k in keep.values()) and sum(k.sum() for k in keep.values()) < sum(
        k.size for k in keep.values()
    )
    folded = gates.fold(params, values, specs)
    masks = gates.keep_masks(folded, specs, keep)
    trained = nnx.merge(graphdef, folded, rest)
    small = collapse.collapse(trained, masks, found)
    ref = collapse.masked(trained, masks, found)
    ref.eval()
    small.eval()
    a, b = ref(x), small(x)
    assert a.shape == b.shape == (8, 16, 16, 3)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))
    # The collapsed U-Net's compute is what the 0/1 gates said.
    hard = {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
    assert sum(costs.layer_macs(small, x[:1]).values()) == round(float(macs_model(hard)))
    assert sum(costs.layer_macs(small, x[:1]).values()) < 0.6 * dense_macs


def test_closed_residual_branches_are_removed_and_other_groups_keep_a_channel():
    model = models.get("resnet20", in_shape=(8, 8, 3), num_classes=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    found = discovery.discover_nnx(model, x)
    params = nnx.state(model, nnx.Param)
    removable = collapse.removable_groups(model, found.specs, params)
    # The inner group of every basic block; never a residual stream or the stem.
    assert removable == {f"stage{s}/block{b}/conv1" for s in (1, 2, 3) for b in range(3)}
    # Every gate closed: streams keep their best channel, branches vanish.
    scores = {k: jnp.arange(v.size, dtype=jnp.float32) for k, v in gates.init(params, found.specs).items()}
    closed = {k: np.zeros(v.shape, bool) for k, v in scores.items()}
    keep = methods.keep_at_least_one(closed, scores, removable)
    assert all(keep[g].sum() == (0 if g in removable else 1) for g in keep)
    assert all(keep[g][-1] for g in keep if g not in removable)  # the best-scoring channel
    masks = gates.keep_masks(params, found.specs, keep)
    small = collapse.collapse(model, masks, found)
    assert all(small.stage1[f"block{b}"].conv1 is None for b in range(3))
    ref = collapse.masked(model, masks, found)
    ref.eval()
    small.eval()
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-6)
