"""Size, compute and speed of a network: parameter counts, FLOPs, latency.

Functions take a pure function plus pytree arguments; an ``nnx.Module`` is
also accepted in place of the function (it is split with
:func:`admmprune.models.apply_fn` style ``nnx.split``/``nnx.merge``, so the
module is never mutated and ``nnx.jit`` is not used).

FLOPs are whatever XLA's cost analysis of the compiled function reports, not
a per-layer formula. Its convention (checked on jax 0.10.2, CPU):

* a dot ``(m, k) @ (k, n)`` counts ``2 * m * n * k`` (one multiply and one
  add per multiply-accumulate);
* a convolution counts ``2 * output_elements * kernel_h * kernel_w * in_channels``
  per image, i.e. again 2 per multiply-accumulate; the bias add is a separate
  elementwise op;
* elementwise ops (bias add, relu) count one FLOP per output element, and a
  max over ``n`` elements counts ``n - 1`` (so a 2x2 pool is 3 per output).

So LeNet-5 (Caffe, batch 1) reports exactly 4,612,770 FLOPs: 2 x 2,293,000
multiply-accumulates plus 26,770 for bias adds, relu and pooling. The count
scales linearly with the batch size.
"""

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admmprune.models.layers import reference_forms

__all__ = ["count_nonzero", "count_params", "flops", "latency_ms"]


def _is_none(x: Any) -> bool:
    return x is None


def count_params(tree: Any) -> int:
    """Number of array elements in a pytree; ``None`` leaves are skipped.

    Works on concrete arrays, ``jax.ShapeDtypeStruct`` leaves (from
    ``jax.eval_shape``), ``nnx.State`` and ``nnx.Module`` alike.

    Args:
        tree: any pytree whose leaves have a ``shape`` (or are scalars).

    Returns:
        The total element count as a Python int.

    Examples:
        >>> count_params({"w": jnp.zeros((3, 4)), "b": None})
        12
    """
    leaves = jax.tree.leaves(tree, is_leaf=_is_none)
    return sum(math.prod(np.shape(x)) for x in leaves if x is not None)


def count_nonzero(tree: Any) -> int:
    """Number of non-zero array elements in a pytree; ``None`` leaves are skipped.

    For a masked parameter tree this is the number of surviving weights; for a
    boolean mask tree it is the number of ``True`` entries. Needs concrete
    arrays (not usable under ``jit``, since it returns a Python int).

    Args:
        tree: a pytree of arrays.

    Returns:
        The total count of non-zero elements as a Python int.
    """
    leaves = jax.tree.leaves(tree, is_leaf=_is_none)
    return sum(int(jnp.count_nonzero(x)) for x in leaves if x is not None)


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _as_function(fn: Callable[..., Any] | nnx.Module, args: tuple) -> tuple[Callable, tuple]:
    """Turn an ``nnx.Module`` into ``(pure_fn, (state, *args))``; pass functions through."""
    if not isinstance(fn, nnx.Module):
        return fn, args
    graphdef, state = nnx.split(fn)

    def pure(state: nnx.State, *a: Any) -> Any:
        return nnx.merge(graphdef, state, copy=True)(*a)

    return pure, (state, *args)


def flops(fn: Callable[..., Any] | nnx.Module, *example_args: Any) -> float:
    """FLOPs of one call of ``jax.jit(fn)`` as counted by XLA's cost analysis.

    Nothing is allocated or run: array arguments are replaced by
    ``jax.ShapeDtypeStruct`` and the function is only lowered and compiled.
    See the module docstring for what XLA counts (2 per multiply-accumulate).

    Args:
        fn: a function of pytrees of arrays, or an ``nnx.Module`` (then called
            as ``fn(*example_args)``).
        *example_args: arrays, ``jax.ShapeDtypeStruct`` or pytrees of them;
            the batch size is the caller's choice.

    Returns:
        The FLOP count as a float.

    Raises:
        RuntimeError: if the backend's cost analysis reports no ``"flops"``.

    Examples:
        >>> a = jax.ShapeDtypeStruct((8, 16), jnp.float32)
        >>> b = jax.ShapeDtypeStruct((16, 32), jnp.float32)
        >>> flops(jnp.matmul, a, b)
        8192.0
    """
    fn, args = _as_function(fn, example_args)
    args = jax.tree.map(_abstract, args)
    with reference_forms():  # count a conv's FLOPs as a conv's, whatever form runs it
        analysis = jax.jit(lambda *a: fn(*a)).lower(*args).compile().cost_analysis()
    # Older jax returned a list with one dict per device program.
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        raise RuntimeError(f"XLA cost analysis reported no 'flops' on {jax.default_backend()}")
    return float(analysis["flops"])


def latency_ms(
    fn: Callable[..., Any] | nnx.Module,
    *args: Any,
    repeats: int = 50,
    warmup: int = 3,
    compiler_options: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Wall-clock time of one call of ``jax.jit(fn)(*args)`` in milliseconds.

    Compilation and ``warmup`` calls are excluded; each timed call waits for
    its result with ``jax.block_until_ready``. The batch size is whatever
    ``args`` carries.

    Args:
        fn: a function of pytrees of arrays, or an ``nnx.Module`` (then called
            as ``fn(*args)``).
        *args: concrete arguments (arrays or pytrees of arrays).
        repeats: number of timed calls (>= 1).
        warmup: number of untimed calls after compilation.
        compiler_options: XLA options for this compilation (``jax.jit``'s
            ``compiler_options``), e.g. ``pipeline.CPU_COMPILER_OPTIONS``;
            default XLA's.

    Returns:
        ``{"median", "p10", "p90", "min", "mean"}``, all in ms.

    Raises:
        ValueError: if ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}")
    fn, args = _as_function(fn, args)
    jitted = jax.jit(fn, compiler_options=None if compiler_options is None else dict(compiler_options))
    args = jax.device_put(args)
    jax.block_until_ready(jitted(*args))  # compile
    for _ in range(warmup):
        jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append((time.perf_counter() - start) * 1e3)
    p10, p90 = np.percentile(times, [10, 90])
    return {
        "median": statistics.median(times),
        "p10": float(p10),
        "p90": float(p90),
        "min": min(times),
        "mean": statistics.fmean(times),
    }
