"""admmprune: structured pruning of JAX networks with ADMM.

The core (this namespace) is pure functions and optax transformations over
plain pytrees; it does not import flax.

The code is organised by layers, each importing only the ones below it
(``pyproject.toml``'s import contract checks this):

- ``admmprune.core``: sparsity specs, channel groups, projections, ADMM and
  the other optax transformations (no flax);
- ``admmprune.structure``: discovery of channel groups, criteria, gates,
  costs, measurements, collapse;
- ``admmprune.models``: the model zoo (flax NNX);
- ``admmprune.runtime``: data, checkpoints, distributed execution, export;
- ``admmprune.app``: the pipeline, the methods and the analysis;
- ``admmprune.train``, ``admmprune.analyze``, ``admmprune.export``: the
  command lines.

The modules users imported before this layout (``admmprune.collapse``,
``admmprune.pipeline``, ...) are aliases of their new homes.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

from admmprune._errors import UserError
from admmprune._types import path_str
from admmprune.core import projections, schedules, sparsity
from admmprune.core.admm import AdmmState, admm, find_state, residuals, set_stage
from admmprune.core.masking import MaskedState, apply_masks, hard_prune, keep_masked, mask_sparsity
from admmprune.core.projections import project, project_tree
from admmprune.core.schedules import (
    constant_rho,
    geometric_rho,
    residual_balancing_rho,
    stage_ratios,
)
from admmprune.core.sparsity import (
    Block,
    Channel,
    Column,
    Coupled,
    Filter,
    NofM,
    Unstructured,
    default_rules,
    format_plan,
    resolve,
)

#: Where each module of the flat layout lives now: ``import admmprune.collapse``
#: and ``from admmprune import collapse`` keep working.
MOVED_MODULES = {
    "sparsity": "admmprune.core.sparsity",
    "projections": "admmprune.core.projections",
    "admm": "admmprune.core.admm",
    "masking": "admmprune.core.masking",
    "schedules": "admmprune.core.schedules",
    "regularizers": "admmprune.core.regularizers",
    "graph": "admmprune.structure.graph",
    "discovery": "admmprune.structure.discovery",
    "collapse": "admmprune.structure.collapse",
    "costs": "admmprune.structure.costs",
    "budget": "admmprune.structure.budget",
    "gates": "admmprune.structure.gates",
    "criteria": "admmprune.structure.criteria",
    "measure": "admmprune.structure.measure",
    "data": "admmprune.runtime.data",
    "checkpoint": "admmprune.runtime.checkpoint",
    "distributed": "admmprune.runtime.distributed",
    "pipeline": "admmprune.app.pipeline",
    "methods": "admmprune.app.methods",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``admmprune.<old name>`` to the module at its new path, imported
    only when asked for (the core namespace stays free of flax and orbax)."""

    def find_spec(self, fullname, path, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix == __name__ and name in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        # The import system returns whatever sys.modules holds under the name
        # once this returns: the real module, not the empty placeholder.
        sys.modules[module.__name__] = importlib.import_module(MOVED_MODULES[module.__name__.rpartition(".")[2]])


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
# The core's modules are loaded already: alias them now, so that a later
# ``import admmprune.admm`` finds the module in sys.modules and does not rebind
# the ``admmprune.admm`` function to it.
for _name in ("sparsity", "projections", "admm", "masking", "schedules"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(MOVED_MODULES[_name])
del _name


def __getattr__(name):
    # ``admmprune.collapse`` after a bare ``import admmprune``, as before.
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it


def load(path, like=None):
    """Rebuilds a model saved with ``admmprune.runtime.checkpoint.save_model`` (e.g. a
    run's collapsed model), from its arrays and architecture metadata; a model
    that is not admmprune's needs ``like``, the function that builds it (see
    ``admmprune.runtime.checkpoint.load_model``).

    Imported lazily: the core namespace does not import flax or orbax.
    """
    from admmprune.runtime.checkpoint import load_model

    return load_model(path, like=like)


__all__ = [
    "AdmmState",
    "Block",
    "Channel",
    "Column",
    "Coupled",
    "Filter",
    "MaskedState",
    "NofM",
    "Unstructured",
    "UserError",
    "admm",
    "apply_masks",
    "constant_rho",
    "default_rules",
    "find_state",
    "format_plan",
    "geometric_rho",
    "hard_prune",
    "keep_masked",
    "load",
    "mask_sparsity",
    "path_str",
    "project",
    "project_tree",
    "projections",
    "residual_balancing_rho",
    "residuals",
    "resolve",
    "schedules",
    "set_stage",
    "sparsity",
    "stage_ratios",
]
