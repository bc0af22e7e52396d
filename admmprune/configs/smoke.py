"""The whole pipeline on a small slice of MNIST, in well under a minute on CPU.

    python -m admmprune.train --config configs/smoke.py --workdir /tmp/smoke

Dense training, every ADMM stage, hard prune, retraining and the report, on
1,024 training and 512 test images. Tests and notebooks use it.
"""

from admmprune.configs import default


def get_config():
    c = default.get_config()
    c.data.limit = 1024
    c.data.eval_limit = 512
    c.data.batch_size = 64
    c.data.eval_batch_size = 256
    c.dense.epochs = 2
    # The default 0.05 with a 10% warm-up needs more than this slice's 32
    # steps to warm up: here the loss becomes NaN at step 12.
    c.dense.learning_rate = 0.01
    c.dense.warmup = 0.0
    c.admm.epochs_per_stage = 1
    c.admm.interval = 4
    c.admm.rho = 1e-2
    c.retrain.epochs = 1
    c.log_every = 4
    c.checkpoint_every = 8
    c.measure.repeats = 5
    c.progress = False
    return c
