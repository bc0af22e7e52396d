"""Model registry and the bridge from an ``nnx.Module`` to a pure function.

Models:
    ``"lenet5"``: :class:`LeNet5`, output layer ``fc2``.
    ``"mlp"``: :class:`MLP`, output layer ``head``.
    ``"vgg11"``, ``"vgg16"``, ``"vgg19"``: CIFAR VGGs with BatchNorm
    (:mod:`~admmprune.models.vgg`), output layer ``head``.
    ``"resnet20"``, ``"resnet32"``, ``"resnet56"``, ``"resnet110"``: CIFAR
    ResNets; ``"resnet18"``, ``"resnet50"``: ImageNet ResNets
    (:mod:`~admmprune.models.resnet`), output layer ``head``.
    ``"mobilenetv2"``: :class:`~admmprune.models.mobilenet.MobileNetV2`,
    output layer ``head``.
    ``"unet"``: :class:`~admmprune.models.unet.UNet` (per-pixel logits
    ``(B, H, W, num_classes)``), output layer ``head``.
    ``"vit"``: :class:`~admmprune.models.vit.ViT`, output layer ``head``.
    ``"gpt"``: :class:`~admmprune.models.gpt.GPT` (logits ``(B, T, num_classes)``), output layer ``head``.

The convnets with BatchNorm follow ``model.train()`` / ``model.eval()``, take
``in_shape=(H, W, C)`` and list one width per conv in ``widths`` (with
``width_layers`` naming the conv of each entry).

Each model class has ``output_layer`` (the name of the logits layer, whose
outputs must never be pruned), and each instance has ``widths`` (its prunable
widths) and ``config`` (its constructor keyword arguments but ``rngs``), so
``get(name_of(model), **{**model.config, ...}, rngs=...)`` rebuilds it.
"""

import collections.abc
import inspect
import reprlib
import types
import typing
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.gpt import GPT
from admmprune.models.lenet import LeNet5
from admmprune.models.mlp import MLP
from admmprune.models.mobilenet import MobileNetV2
from admmprune.models.resnet import ResNet18, ResNet20, ResNet32, ResNet50, ResNet56, ResNet110
from admmprune.models.unet import UNet
from admmprune.models.vgg import VGG11, VGG16, VGG19
from admmprune.models.vit import ViT

__all__ = ["MLP", "LeNet5", "apply_fn", "check_config", "get", "get_class", "name_of", "names"]

_REGISTRY: dict[str, type[nnx.Module]] = {
    "lenet5": LeNet5,
    "mlp": MLP,
    "gpt": GPT,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "mobilenetv2": MobileNetV2,
    "unet": UNet,
    "vit": ViT,
}


def names() -> tuple[str, ...]:
    """The registered model names, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str, **kwargs: Any) -> nnx.Module:
    """Build the model registered as ``name``.

    Args:
        name: one of :func:`names`.
        **kwargs: forwarded to the model's constructor. ``rngs`` defaults to
            ``nnx.Rngs(0)``.

    Returns:
        A freshly initialised model.

    Raises:
        UserError: if ``name`` is not registered, or the constructor rejects
            the widths.

    Examples:
        >>> get("lenet5", features=(5, 12, 100)).widths
        (5, 12, 100)
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; valid names: {', '.join(names())}")
    kwargs.setdefault("rngs", nnx.Rngs(0))
    return _REGISTRY[name](**kwargs)


def get_class(name: str) -> type[nnx.Module]:
    """The model class registered as ``name``.

    Raises:
        UserError: if ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[name]


def check_config(name: str, config: Any) -> dict[str, Any]:
    """The constructor arguments ``config`` gives model ``name``, checked first.

    For a config read from a file (a saved model's metadata), before anything
    is built from it: it must be a dict of the constructor's own keyword
    arguments (``rngs`` is not one: the caller supplies it), each a JSON value
    of the type the constructor declares (a list of integers for a
    ``Sequence[int]``, an integer for an ``int``, ...). Nothing named in
    ``config`` is imported or called; the constructor checks the values.

    Args:
        name: a registered model name (:func:`names`).
        config: what the file holds where the arguments should be.

    Returns:
        A copy of ``config``, to pass to :func:`get` with ``rngs``.

    Raises:
        UserError: ``name`` is not registered, ``config`` is not a dict, or it
            lacks a required argument, names one the constructor does not take
            (or ``rngs``), or gives one a value of another type.

    Examples:
        >>> check_config("mlp", {"hidden": [4]})
        {'hidden': [4]}
    """
    cls = get_class(name)
    if not isinstance(config, dict):
        raise UserError(
            f"the config of model {name!r} must be a JSON object of its constructor's arguments, "
            f"got {type(config).__name__} {reprlib.repr(config)}"
        )
    arguments = {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "rngs")
    }
    unknown = [key for key in config if key not in arguments]
    if unknown:
        raise UserError(
            f"model {name!r} takes no argument {', '.join(reprlib.repr(k) for k in unknown)}; "
            f"its arguments are {', '.join(arguments)}"
        )
    missing = [k for k, p in arguments.items() if p.default is p.empty and k not in config]
    if missing:
        raise UserError(f"the config of model {name!r} lacks its required argument(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls.__init__)
    for key, value in config.items():
        hint = hints.get(key, Any)
        if not _fits(value, hint):
            raise UserError(f"model {name!r} argument {key} must be {_describe(hint)}, got {reprlib.repr(value)}")
    return dict(config)


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a constructor annotation (unknown annotations: the constructor decides)."""
    if (arms := _union_args(hint)) is not None:
        return any(_fits(value, arm) for arm in arms)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin in (collections.abc.Sequence, list, tuple):
        (item, *rest) = typing.get_args(hint) or (Any,)
        if origin is tuple and rest and rest != [Ellipsis]:
            return False  # fixed-length tuples: not in the zoo
        return isinstance(value, list | tuple) and all(_fits(v, item) for v in value)
    return True


def _describe(hint: Any) -> str:
    if (arms := _union_args(hint)) is not None:
        return " or ".join(_describe(arm) for arm in arms)
    named = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in named:
        return named[hint]
    if typing.get_origin(hint) in (collections.abc.Sequence, list, tuple):
        item = (typing.get_args(hint) or (Any,))[0]
        return f"a list of {_describe(item).removeprefix('an ').removeprefix('a ')}s"
    return str(hint)


def name_of(model: nnx.Module) -> str:
    """The registry name of ``model``'s class (for checkpoint metadata).

    Raises:
        UserError: if the class is not registered.
    """
    for name, cls in _REGISTRY.items():
        if type(model) is cls:
            return name
    raise UserError(f"{type(model).__name__} is not a registered model; valid names: {', '.join(names())}")


def apply_fn(model: nnx.Module) -> tuple[Callable[[nnx.State, jax.Array], jax.Array], nnx.State]:
    """Split ``model`` into a pure forward function and its parameters.

    ``fn(params, x)`` merges the model's graph definition (and any non-``Param``
    state, captured as a constant) with ``params`` and calls it on ``x``. It is
    pure, so it can be passed to ``jax.jit``, ``jax.grad`` or
    ``jax.make_jaxpr``; ``model`` itself is not modified by calls to ``fn``.

    Args:
        model: an ``nnx.Module`` whose ``__call__`` takes one input.

    Returns:
        ``(fn, params)`` where ``params`` is the ``nnx.State`` of the model's
        ``nnx.Param`` variables (paths such as ``conv1/kernel``).

    Examples:
        >>> fn, params = apply_fn(get("lenet5"))
        >>> jax.jit(fn)(params, jnp.zeros((1, 28, 28, 1))).shape
        (1, 10)
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(params: nnx.State, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, rest, copy=True)(x)

    return fn, params
