"""admmprune: structured pruning of JAX networks with ADMM.

The core (this namespace) is pure functions and optax transformations over
plain pytrees; it does not import flax.
"""

from admmprune import projections, schedules, sparsity
from admmprune._errors import UserError
from admmprune.admm import AdmmState, admm, find_state, residuals, set_stage
from admmprune.masking import MaskedState, apply_masks, hard_prune, keep_masked, mask_sparsity
from admmprune.projections import project, project_tree
from admmprune.schedules import (
    constant_rho,
    geometric_rho,
    residual_balancing_rho,
    stage_ratios,
)
from admmprune.sparsity import (
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

__version__ = "0.1.0"


def load(path):
    """Rebuilds a model saved with ``admmprune.checkpoint.save_model`` (e.g. a
    run's collapsed model), from its arrays and architecture metadata.

    Imported lazily: the core namespace does not import flax or orbax.
    """
    from admmprune.checkpoint import load_model

    return load_model(path)

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
