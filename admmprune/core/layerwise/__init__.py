r"""One-shot, layer-wise pruning: each layer's kernel pruned to reproduce its outputs (layer L2).

For one layer :math:`y = x W` with a Flax kernel ``W`` of shape ``(..., d_out)``
(a dense kernel ``(d_in, d_out)``, a conv kernel ``(kh, kw, c_in, c_out)``
whose leading axes flatten in C order into :math:`d_\mathrm{in}`, like the
patches of :func:`conv_patches`), calibration inputs :math:`X` and targets
:math:`Y`:

.. math:: \min_{W \in S}\ \|X W - Y\|_F^2
          = \operatorname{tr}(W^\top H W) - 2 \operatorname{tr}(W^\top G) + \text{const},
          \qquad H = X^\top X,\ G = X^\top Y.

Usually :math:`Y = X W_0`, the dense layer's output, so :math:`G = H W_0`;
in a sequential pass :math:`X` comes from the already pruned layers below
and :math:`Y` from the dense model, so every solver takes a general ``g``
too. :math:`S` is the set of a spec of :mod:`admmprune.core.sparsity`
(``Unstructured()``, ``NofM(2, 4)``, ``Channel()``: whole inputs, i.e. the
input channels that a pruned neuron of the layer below leaves dead) on the
kernel in its own shape, and every solver returns a kernel that lies in it
exactly (the support of :func:`admmprune.core.projections.projection_mask`).

Accumulate :math:`H` (and :math:`G`) over calibration batches with
:func:`init_gram` and :func:`accumulate`, then prune:

- :func:`admm`: ADMM on the exact objective (Boža 2024; ALPS, Meng et al.
  2024) in the variables normalized by :math:`\operatorname{diag}(H)^{1/2}`,
  with a penalty that grows over a few stages (one inverse each), and a
  least-squares :func:`refit` on the final support;
- :func:`sparsegpt`: the greedy optimal-brain-surgeon update with lazy
  blocks (Frantar and Alistarh 2023);
- :func:`wanda`: keeps the largest :math:`|W_{ij}|\,\|X_j\|` (Sun et al.
  2024), no update;
- :func:`magnitude`: the projection of :math:`W_0`, no update.

All are pure and jittable, with the keep ratio a traced scalar, and batched
over the outputs: shard ``w0`` (and ``g``) on the output axis and replicate
``h``, and the result is what one device gives, up to the order in which
floating-point sums are added. That order can decide between two weights at
the threshold of :func:`admm`'s hard projections: on a 4096 x 4096 layer
sharded over 8 devices, 0.005-0.014 % of the mask differed with float32
products and 0.3-0.7 % with the default bfloat16 ones, with the same error to
five digits; small layers gave identical masks.

Example::

    state = layerwise.init_gram(d_in)
    for x in batches:                       # the layer's inputs, (..., d_in)
        state = layerwise.accumulate(state, x)
    w = layerwise.admm(state.h, kernel, Unstructured(), 0.3)
    layerwise.reconstruction_error(w, kernel, state.h)

References:
  Boža, "Fast and Effective Weight Update for Pruned Large Language Models",
  TMLR 2024 (arXiv:2401.02938).
  Meng, Behdin, Wang and Mazumder, "ALPS: Improved Optimization for Highly
  Sparse One-Shot Pruning for Large Language Models", NeurIPS 2024
  (arXiv:2406.07831).
  Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot", ICML 2023 (arXiv:2301.00774).
  Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for
  Large Language Models", ICLR 2024 (arXiv:2306.11695).
"""

from admmprune.core.layerwise._admm import admm, refit
from admmprune.core.layerwise._baselines import magnitude, sparsegpt, wanda
from admmprune.core.layerwise._problem import (
    GramState,
    accumulate,
    conv_patches,
    damp,
    gram,
    init_gram,
    objective,
    reconstruction_error,
)

__all__ = [
    "GramState",
    "accumulate",
    "admm",
    "conv_patches",
    "damp",
    "gram",
    "init_gram",
    "magnitude",
    "objective",
    "reconstruction_error",
    "refit",
    "sparsegpt",
    "wanda",
]
