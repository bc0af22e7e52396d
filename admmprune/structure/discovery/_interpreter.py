"""The jaxpr interpreter of discovery: walks the equations and dispatches each
primitive to its rule, following calls and ``cond`` branches inside."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._records import UNSUPPORTED, AVal, Records
from ._rules import GROUP_RULES, RULES

_CALLS = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "remat2",
    "checkpoint",
}


def _where(eqn: Any) -> str:
    """The user's source line of an equation, or ``""``."""
    try:
        from jax._src import source_info_util  # private, only used for messages

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a message without a location is still a message
        return ""


class Tracer(Records):
    """The union-find records, run over a jaxpr."""

    def __init__(self, paths: Sequence[str], *, approximate: bool = False):
        super().__init__(paths, approximate=approximate)
        self.where: list[str] = []  # source lines of the calls being followed

    # -- the interpreter --

    def run(self, jaxpr: Any, consts: Sequence[AVal], args: Sequence[AVal]) -> list[AVal]:
        env: dict[Any, AVal] = {}
        for v, a in itertools.chain(zip(jaxpr.constvars, consts, strict=True), zip(jaxpr.invars, args, strict=True)):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, a in zip(eqn.outvars, outs, strict=True):
                env[v] = a
        return [self.read(env, v) for v in jaxpr.outvars]

    def read(self, env: dict, v: Any) -> AVal:
        if hasattr(v, "val"):  # a Literal
            return self.constant(v.val, "literal")
        return env[v]

    def constant(self, val: Any, what: str) -> AVal:
        shape = tuple(np.shape(val))
        try:
            arr = np.asarray(val)
            allzero = arr.size <= 1 << 16 and arr.dtype.kind in "biuf" and not np.any(arr)
            value = float(arr) if arr.shape == () and arr.dtype.kind in "biuf" else None
        except Exception:  # noqa: BLE001 - e.g. typed PRNG keys: nothing to know
            allzero, value = False, None
        reason = (
            f"a {what} of shape {shape} acts on them (e.g. a variable captured by fn instead of passed in "
            "params: pass it as a parameter, or use discover_nnx, to prune through it)"
        )
        descs = tuple(self.opaque(n, UNSUPPORTED, reason) for n in shape)
        return AVal(shape, descs, (allzero,) * len(shape), allzero, value)

    def eqn(self, eqn: Any, ins: list[AVal]) -> list[AVal]:
        name = eqn.primitive.name
        # Inside library functions (jnp.sort is a jit) the user's line is the call's.
        where = _where(eqn) or (self.where[-1] if self.where else "?")
        site = f"`{name}` at {where}"
        if name in _CALLS or name == "cond":
            self.where.append(where)
            try:
                return self.call(eqn, ins, site) if name in _CALLS else self.cond(eqn, ins, site)
            finally:
                self.where.pop()
        rule = RULES.get(name)
        if rule is None:
            for group, fn in GROUP_RULES:
                if name in group:
                    rule = fn
                    break
        if rule is None:
            return self.unsupported(eqn, ins, site)
        return rule(self, eqn, ins, site)

    def call(self, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
        p = eqn.params
        sub = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
        if sub is None:
            return self.unsupported(eqn, ins, site)
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
        if len(jaxpr.invars) != len(ins) or len(jaxpr.outvars) != len(eqn.outvars):
            return self.unsupported(eqn, ins, site)
        return self.run(jaxpr, [self.constant(c, "constant") for c in consts], ins)

    def cond(self, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
        results = [
            self.run(b.jaxpr, [self.constant(c, "constant") for c in b.consts], ins[1:]) for b in eqn.params["branches"]
        ]
        outs = []
        for per_branch in zip(*results, strict=True):
            shape = per_branch[0].shape
            descs = []
            for ax in range(len(shape)):
                d = None
                for a in per_branch:
                    d = self.unify(d, a.descs[ax], site)
                descs.append(d)
            zero = tuple(all(a.zero[ax] for a in per_branch) for ax in range(len(shape)))
            outs.append(AVal(shape, tuple(descs), zero, all(a.allzero for a in per_branch)))
        return outs
