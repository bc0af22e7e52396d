"""Type aliases and the few pytree utilities every layer shares (layer L0).

Nothing here imports flax: a Linen params dict, an NNX ``State`` and an
Equinox model's arrays are all plain pytrees to admmprune.
"""

from __future__ import annotations

from typing import Any

import jax

#: A pytree of arrays: model parameters, or updates shaped like them.
Params = Any
#: A pytree shaped like ``Params`` whose leaves are specs, or ``None`` for a
#: parameter that is not pruned.
Specs = Any
#: A pytree shaped like ``Params`` whose leaves are boolean arrays (``True``
#: where a weight is kept), or ``None`` for a parameter that is not pruned.
Masks = Any
#: A pytree shaped like ``Params`` whose leaves are scalars, or ``None``.
Scalars = Any


def is_none(x: Any) -> bool:
    """``is_leaf`` predicate that keeps ``None`` as a leaf ("not pruned")."""
    return x is None


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple[Any, ...]) -> str:
    """Joins a ``jax.tree_util`` key path with ``/``.

    A trailing ``.value`` attribute (how a Flax NNX ``Variable`` exposes its
    array) is dropped, so an NNX ``State`` and the equivalent Linen dict both
    give paths such as ``conv1/kernel``.
    """
    names = [_key_name(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def tree_paths(tree: Params, is_leaf: Any = None) -> Any:
    """Returns a pytree shaped like ``tree`` whose leaves are their ``/`` paths."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree, is_leaf=is_leaf)


def per_leaf(value: Any, treedef: Any, n: int) -> list[Any]:
    """A value for each of the ``n`` leaves of ``treedef``: ``value`` itself if
    it is a single leaf (a scalar), else its leaves (a tree shaped like the
    tree ``treedef`` describes)."""
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
        return [value] * n
    return treedef.flatten_up_to(value)
