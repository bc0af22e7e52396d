"""Time one jitted LeNet-5 SGD training step (run by hand, not a test).

    python benchmarks/bench_lenet_step.py [--batch 128] [--steps 50] [--warmup 5]

The step is cross-entropy + ``optax.sgd(0.01, momentum=0.9)`` on random
28x28x1 images, jitted with ``jax.jit`` over ``nnx.split`` state (as Flax's
performance guide recommends), with the parameters and optimizer state
donated. Prints the median, p10 and p90 step time in ms.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admmprune import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    fn, params = models.apply_fn(models.get("lenet5"))
    tx = optax.sgd(0.01, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = fn(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(ky, (args.batch,), 0, 10)

    for _ in range(args.warmup + 1):  # the first call compiles
        params, opt_state, loss = step(params, opt_state, x, y)
    jax.block_until_ready(loss)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, x, y)
        jax.block_until_ready(loss)
        times.append((time.perf_counter() - start) * 1e3)
    p10, p90 = np.percentile(times, [10, 90])
    print(
        f"LeNet-5 SGD step, batch {args.batch}, {jax.devices()[0].platform}: "
        f"median {statistics.median(times):.2f} ms (p10 {p10:.2f}, p90 {p90:.2f}) "
        f"over {args.steps} steps, final loss {float(loss):.3f}"
    )


if __name__ == "__main__":
    main()
