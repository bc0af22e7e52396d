"""The flax-free core (layers L1-L2): sparsity specs, their channel groups and
Euclidean projections, and the optax transformations built on them (ADMM,
masked retraining, rho schedules, regularizers).

Everything here takes and returns plain pytrees, so a Linen param dict, an
NNX ``State`` or an Equinox model all work; nothing here imports flax (the
import contract in ``pyproject.toml`` checks it).
"""
