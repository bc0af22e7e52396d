"""LeNet-5 on MNIST, pruned with progressive ADMM to structured sparsity.

    python -m admmprune.train --ratio 0.9

Every field is documented here; other configs import this one and override a
few. Override any field on the command line: ``--config.admm.rho=0.01``.
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    # Seed of the model's initialization and of every data pipeline.
    c.seed = 0

    c.model = ConfigDict()
    # A name from admmprune.models.names(): "lenet5", "mlp", or another
    # classification model of the zoo ("vgg16", "resnet20", "mobilenetv2", ...).
    c.model.name = "lenet5"

    c.data = ConfigDict()
    # A tfds dataset name; mnist and fashion_mnist are prepared offline on first use.
    c.data.name = "mnist"
    # The tfds data directory; None means $TFDS_DATA_DIR or ~/tensorflow_datasets.
    c.data.data_dir = config_dict.placeholder(str)
    # The tfds split to train on.
    c.data.train_split = "train"
    # The tfds split that accuracies are measured on.
    c.data.eval_split = "test"
    # Global training batch: split across all devices, so it must divide by
    # their number (docs/distributed.md).
    c.data.batch_size = 128
    # Batch size of evaluation.
    c.data.eval_batch_size = 1000
    # Use only the first N training examples (None: all of them).
    c.data.limit = config_dict.placeholder(int)
    # Use only the first N evaluation examples (None: all of them).
    c.data.eval_limit = config_dict.placeholder(int)
    # Comma-separated augmentations: "", "random_crop_pad", "flip".
    c.data.augment = ""
    # Normalize pixels with the dataset's mean and std (else only scale to [0, 1]).
    c.data.normalize = True

    # Shared by every training phase: SGD with Nesterov-free momentum.
    c.optimizer = ConfigDict()
    # Momentum of SGD (0: plain SGD).
    c.optimizer.momentum = 0.9
    # Weight decay: weight_decay * W is added to the gradient before SGD.
    c.optimizer.weight_decay = 5e-4

    # Phase 1: train the dense model.
    c.dense = ConfigDict()
    # Epochs of dense training.
    c.dense.epochs = 4
    # Learning rate of SGD in this phase (where a cosine schedule starts).
    # Torch-Pruning's LeNet-5 recipe: 0.05 with a 10% warm-up reaches
    # 99.25 +- 0.03% in 4 epochs (3 seeds), 0.01 without warm-up 98.91%; on
    # ResNet-20 / Fashion-MNIST 92.15 +- 0.11% in 3 epochs (2 seeds; suite.json).
    c.dense.learning_rate = 0.05
    # "cosine" (decay to 0 over the phase) or "constant".
    c.dense.schedule = "cosine"
    # Fraction of the phase's steps over which the learning rate rises linearly
    # from 0 to dense.learning_rate (then the schedule runs over the rest).
    c.dense.warmup = 0.1
    # A trained dense model to start from instead of training one: a pipeline
    # workdir (its dense/ model) or a directory admmprune.load reads. It must
    # be this config's model (same architecture and widths); the dense phase
    # is then skipped (dense.* is not used) and the report records the path.
    # Methods compared on one seed share one dense model this way.
    c.dense.init = ""

    c.prune = ConfigDict()
    # "admm", or a method it is compared with, each pruning the same channel
    # groups after the same dense phase, for the same epochs (admmprune/methods.py):
    # "magnitude" (filter pruning by prune.criterion, one-shot or iterative),
    # "l1_mask" (learned L1-regularized channel masks), "slimming" (L1 on
    # BatchNorm scales), "relaxation" (sigmoid channel gates with a FLOPs
    # target) or "group_lasso" (group-sparsity regularized training).
    c.prune.method = "admm"
    # The criterion of "magnitude": l1, l2, fpgm, bn_scale, taylor, lamp or random
    # (admmprune/criteria.py); l2 is the Euclidean projection ADMM uses.
    c.prune.criterion = "l2"
    # Rank channels within each layer ("layer": every layer loses `ratio` of its
    # channels) or across all layers ("global": the network loses `ratio` of
    # all channels; each layer keeps at least one). For magnitude, l1_mask,
    # slimming and group_lasso; ADMM and the relaxation are layer-wise and global.
    # With a prune.sparsity other than channel, it is ADMM's and magnitude's:
    # "global" ranks the weights (columns, blocks) of all pruned kernels together.
    c.prune.scope = "layer"
    # Fraction of channels (conv filters, dense neurons) removed in every
    # prunable layer; the output layer is never pruned. --ratio sets it. With
    # prune.sparsity unstructured, column or block: the fraction of every pruned
    # kernel's weights, columns or blocks removed (of all of them, with
    # prune.scope=global).
    c.prune.ratio = 0.9
    # Ratios of the progressive stages, ending at `ratio`; None derives them:
    # removed fraction 0.5, 0.75, 0.875, ... while below ratio - 0.05, then ratio.
    c.prune.stages = config_dict.placeholder(tuple)
    # Keep a multiple of this many channels in every layer (8 suits GPU tensor
    # cores, 128 TPU matrix units); 1 keeps exactly round((1 - ratio) * C).
    c.prune.round_to = 1
    # What `ratio` (and each stage's ratio) removes: "channels" (that fraction
    # of every prunable layer's channels) or "macs" (that fraction of the
    # model's conv/dense multiply-accumulates, the layers competing for what is
    # kept: admmprune.budget's greedy projection; method admm only, round_to
    # does not apply). --ratio 0.75 --config.prune.budget=macs keeps at most a
    # quarter of the dense model's MACs.
    c.prune.budget = "channels"
    # What is pruned. "channel": coupled channel groups (conv filters, dense
    # neurons, with what reads them), collapsed at the end into a smaller model
    # (WORKDIR/model). Otherwise a set on the kernel of every layer that channel
    # pruning prunes (never the output layer; biases and norms stay dense), and
    # WORKDIR/model is the masked model, of the dense shapes, with the report
    # counting its non-zero weights: "unstructured" (single weights), "nm"
    # (prune.n of every prune.m consecutive weights along the input channels),
    # "column" (a window position and input channel across all filters) or
    # "block" (tiles of prune.block). For methods admm and magnitude (criterion
    # l2: the Euclidean projection onto the set); budget=macs and round_to are
    # for channels. The nm set is fixed, so ratio and stages do not apply: one
    # stage of admm.epochs_per_stage epochs, reported as ratio 1 - n/m.
    # --sparsity sets it.
    c.prune.sparsity = "channel"
    # prune.sparsity="nm": at most n non-zeros in every m consecutive weights
    # along a kernel's input axis (2:4 is what GPU sparse tensor cores run).
    c.prune.n = 2
    # The m of prune.n non-zeros in every m weights (n < m).
    c.prune.m = 4
    # prune.sparsity="block": the tile on a kernel's trailing axes (input,
    # output channels); a conv kernel's window axes have tiles of size 1.
    c.prune.block = (4, 4)

    # Phase 2 (method "admm"): one ADMM stage per ratio of prune.stages.
    c.admm = ConfigDict()
    # Epochs of every ADMM stage (and of every other method's stage).
    c.admm.epochs_per_stage = 2
    # Learning rate of SGD in the stages (where a cosine schedule starts).
    c.admm.learning_rate = 0.01
    # Learning-rate schedule of every stage: "constant" or "cosine".
    c.admm.schedule = "constant"
    # Initial penalty rho; it carries over from stage to stage.
    c.admm.rho = 1e-3
    # "constant", "geometric" (x rho_factor per dual update, up to max_rho) or
    # "balancing" (residual balancing).
    c.admm.rho_schedule = "geometric"
    # Factor of the "geometric" rho schedule, per dual update.
    c.admm.rho_factor = 1.3
    # Upper bound of rho for "geometric" and "balancing".
    c.admm.max_rho = 1.0
    # Steps between the projections/dual updates. Short intervals matter: between
    # two updates the penalty anchors the kept weights to their last value
    # (Z = W + U there), so a long interval at a large rho stalls training.
    # Measured on LeNet-5 at ratio 0.9 (README): 100 -> 98.46%, 20 -> 98.56%,
    # 10 -> lower, 5 -> diverged.
    c.admm.interval = 20
    # Which weights the penalty rho (W - Z + U) pulls: "all" (textbook ADMM:
    # it also anchors every kept weight to its value at the last dual update)
    # or "pruned" (only those the last projection removed; the kept ones train
    # freely between updates).
    c.admm.penalty = "all"

    # The other methods. Their regularized training ("sparsify") phase lasts as
    # long as ADMM's stages (admm.epochs_per_stage per stage) and uses
    # admm.learning_rate and admm.schedule, so that budgets are equal.
    c.magnitude = ConfigDict()
    # Prune at every ratio of prune.stages with admm.epochs_per_stage epochs of
    # fine-tuning in between (else one-shot at the final ratio).
    c.magnitude.iterative = False
    c.l1_mask = ConfigDict()
    # lambda of loss + lambda * sum |m| over all channel masks m (initialised to 1).
    c.l1_mask.strength = 1e-3
    # Masks below delta count as removed in the report (the removal itself
    # keeps 1 - ratio of the channels, by |m|).
    c.l1_mask.delta = 1e-2
    c.slimming = ConfigDict()
    # lambda of the L1 term on BatchNorm scales (on gates for models without BN).
    c.slimming.strength = 1e-3
    c.group_lasso = ConfigDict()
    # lambda of lambda * sum_g sqrt(|g|) ||W_g||, applied as a proximal step.
    c.group_lasso.strength = 1e-3
    c.relaxation = ConfigDict()
    # Gates are sigmoid(s / temperature) of the logits s.
    c.relaxation.temperature = 1.0
    # Initial value of every logit s (sigmoid(3) = 0.95: gates start open).
    c.relaxation.init_logit = 3.0
    # The logits train with Adam at this learning rate (the weights with SGD):
    # the budget term's gradient differs by orders of magnitude between layers.
    c.relaxation.gate_learning_rate = 0.01
    # Weight of relu(log(gated MACs / target))^2; the target is the MACs of the
    # model that keeps 1 - ratio of every layer's channels.
    c.relaxation.flops_weight = 1.0
    # Weight of the mean of g (1 - g), which pushes gates to 0 or 1.
    c.relaxation.polarization_weight = 0.1
    # Channels whose gate ends below it are removed.
    c.relaxation.threshold = 0.5

    # Phase 3: hard prune, then retrain with the masks fixed.
    c.retrain = ConfigDict()
    # Epochs of retraining with the masks fixed.
    c.retrain.epochs = 8
    # Learning rate of SGD in this phase (where a cosine schedule starts).
    c.retrain.learning_rate = 0.01
    # "cosine" (decay to 0 over the phase) or "constant".
    c.retrain.schedule = "cosine"
    # Distillation from the dense model while the masks are fixed (the retrain
    # phase, and magnitude's finetune stages: every method's masked training):
    # the loss is (1 - distill) * cross-entropy + distill * T^2 * KL(teacher
    # || student) on logits divided by T = retrain.temperature (Hinton et al.,
    # 2015). The teacher is WORKDIR/dense in eval mode. 0: off.
    c.retrain.distill = 0.0
    # The temperature T of the distillation.
    c.retrain.temperature = 4.0

    # Latency of the dense and collapsed models' jitted forward pass (eval
    # mode): median of `repeats` timed calls at this batch size, warm-up excluded.
    c.measure = ConfigDict()
    # Batch size of the timed forward pass.
    c.measure.batch_size = 256
    # Timed calls; the latency is their median.
    c.measure.repeats = 20

    # Data parallelism (docs/distributed.md): every training step runs on all
    # devices of all processes, each batch split along the devices, so
    # data.batch_size is the global batch and must divide by the device count.
    # Results do not depend on the device count (up to float rounding), and a
    # run may resume on another one.
    c.distributed = ConfigDict()
    # "replicated": every device holds all parameters, optimizer state and
    # ADMM's Z and U; "fsdp": each of those arrays is split along its largest
    # axis that the device count divides (less memory per device, more traffic).
    c.distributed.param_sharding = "replicated"

    # Per-step training metrics (loss, accuracy, ADMM residual and rho) are
    # fetched from the device and appended to metrics.jsonl every N steps.
    c.log_every = 50
    # Save a checkpoint every N steps (None: at the end of every epoch), and at
    # the end of every phase.
    c.checkpoint_every = config_dict.placeholder(int)
    # Show progress bars (only on a terminal).
    c.progress = True
    return c
