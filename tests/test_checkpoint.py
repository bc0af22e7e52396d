"""Tests of admmprune.checkpoint: round trips, retention, and crash safety."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admmprune import UserError, data
from admmprune.checkpoint import Checkpointer, Restored


def _state(scale=1.0):
    return {
        "params": {
            "conv": {"kernel": jnp.full((3, 3, 1, 4), scale, jnp.float32)},
            "dense": [jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * scale, jnp.zeros(3)],
        },
        "count": jnp.asarray(7, jnp.int32),
        "half": jnp.ones((2,), jnp.bfloat16),
        "host": np.arange(4, dtype=np.int32),  # eval_shape would make int64 int32
    }


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_state_data_state_and_metadata(tmp_path):
    state = _state()
    metadata = {"widths": {"conv": 4, "dense": 3}, "phase": "admm", "stage": 2, "ratio": 0.5}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(10, state, data_state={"next_index": 3}, metadata=metadata)
        restored = ckpt.restore(jax.eval_shape(lambda: state))
    assert isinstance(restored, Restored)
    assert restored.step == 10
    _assert_trees_equal(restored.state, state)
    assert isinstance(restored.state["count"], jax.Array)
    assert restored.data_state == {"next_index": 3}
    assert restored.metadata == metadata


def test_restore_into_concrete_arrays_of_another_value(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(2.0))
        restored = ckpt.restore(_state(0.0))
    _assert_trees_equal(restored.state, _state(2.0))
    assert restored.data_state is None
    assert restored.metadata == {}


def test_latest_step_and_retention(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        for step in (1, 2, 5, 9):
            ckpt.save(step, _state(step), metadata={"step": step})
            assert ckpt.latest_step() == step
        assert ckpt.all_steps() == [5, 9]
        assert ckpt.restore(_state(), step=5).state["params"]["conv"]["kernel"][0, 0, 0, 0] == 5
    # A new process (here: a new manager) sees the same steps.
    with Checkpointer(tmp_path, max_to_keep=2) as again:
        assert again.latest_step() == 9
        assert again.all_steps() == [5, 9]


def test_metadata_is_readable_before_the_target_exists(tmp_path):
    """A collapsed model's shapes come from the metadata: read it, then build the target."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones((5, 8))}, metadata={"width": 8})
        ckpt.save(2, {"w": jnp.ones((5, 3))}, metadata={"width": 3})
        assert ckpt.restore_metadata(step=1) == {"width": 8}
        width = ckpt.restore_metadata()["width"]
        assert width == 3
        target = {"w": jax.ShapeDtypeStruct((5, width), jnp.float32)}
        assert ckpt.restore(target).state["w"].shape == (5, 3)


def test_loader_position_survives_a_checkpoint(tmp_path):
    source = data.ArraySource(np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1), np.zeros(40))
    loader = data.make_loader(source, batch_size=4, seed=0, num_epochs=None)
    it = iter(loader)
    for _ in range(13):
        next(it)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(13, {"x": jnp.zeros(1)}, data_state=it.get_state())
        expected = [next(it)["image"] for _ in range(5)]
        restored = ckpt.restore({"x": jnp.zeros(1)})
    resumed = iter(loader)
    resumed.set_state(restored.data_state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["image"], want)


def test_async_save_then_wait(tmp_path):
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(3, _state(3.0), metadata={"a": 1})
        ckpt.wait()
        assert ckpt.latest_step() == 3
        _assert_trees_equal(ckpt.restore(_state()).state, _state(3.0))


def test_user_errors(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(UserError, match="no checkpoint in"):
            ckpt.restore_metadata()
        with pytest.raises(UserError, match="no checkpoint in"):
            ckpt.restore(_state())
        ckpt.save(4, {"w": jnp.ones((2, 2))})
        with pytest.raises(UserError, match="step 4 is already there"):
            ckpt.save(4, {"w": jnp.ones((2, 2))})
        with pytest.raises(UserError, match="step 3"):
            ckpt.save(3, {"w": jnp.ones((2, 2))})
        with pytest.raises(UserError, match="no checkpoint step 7"):
            ckpt.restore({"w": jnp.ones((2, 2))}, step=7)
        with pytest.raises(UserError, match="does not match"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
    with pytest.raises(UserError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)


_KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from admmprune.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.ones((256, 256))}, metadata={"step": 1})

    # Die the hard way once step 2's arrays are being written, before it is committed.
    async def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.handlers.JsonCheckpointHandler.async_save = die
    ckpt.save(2, {"w": jnp.full((256, 256), 2.0)}, metadata={"step": 2})
    print("not killed")
    """
)


def test_a_save_killed_midway_is_not_picked_up(tmp_path):
    directory = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_SAVE, str(directory)],
        check=False,  # the child is meant to die: its status is asserted below
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr
    leftovers = sorted(os.listdir(directory))
    assert "1" in leftovers and "2" not in leftovers
    assert any(name.startswith("2") for name in leftovers), leftovers  # the half-written step
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 1
        restored = ckpt.restore({"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)})
        assert restored.metadata == {"step": 1}
        np.testing.assert_array_equal(restored.state["w"], 1.0)
        # The temporary directory was cleaned up and step 2 can be saved again.
        assert sorted(os.listdir(directory)) == ["1"]
        ckpt.save(2, {"w": jnp.full((256, 256), 2.0)}, metadata={"step": 2})
        assert ckpt.latest_step() == 2
