import jax, jax.numpy as jnp, optax
import admmprune as ap

kx, kw, kp = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(kx, (1024, 16)); y = jnp.tanh(x @ jax.random.normal(kw, (16, 1)))
sizes = (16, 64, 64, 1)
params = [{"kernel": jax.random.normal(k, (a, b)) / a**0.5, "bias": jnp.zeros(b)}
          for k, a, b in zip(jax.random.split(kp, 3), sizes, sizes[1:])]
# A hidden neuron is its kernel column, its bias and the next kernel's row: one group.
specs = [{"kernel": ap.Filter(group="h0"), "bias": ap.Filter(group="h0")},
         {"kernel": ap.Coupled((ap.Channel(group="h0"), ap.Filter(group="h1"))), "bias": ap.Filter(group="h1")},
         {"kernel": ap.Channel(group="h1"), "bias": None}]

def loss(p):
    h = x
    for layer in p[:-1]: h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
    return jnp.mean((h @ p[-1]["kernel"] + p[-1]["bias"] - y) ** 2)

def fit(params, tx, opt_state, steps=400):
    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s
    for _ in range(steps): params, opt_state = step(params, opt_state)
    return params, opt_state

rho = ap.geometric_rho(1.3, max_rho=1.0)                 # x1.3 per dual update, capped
tx = optax.chain(ap.admm(specs, rho=1e-2, interval=20, rho_schedule=rho), optax.sgd(0.02, momentum=0.9))
opt_state = tx.init(params)
for ratio in ap.stage_ratios(0.9):                       # 0.5 -> 0.75 -> 0.9
    opt_state = ap.set_stage(opt_state, keep_ratio=1 - ratio)
    params, opt_state = fit(params, tx, opt_state)
params, masks = ap.hard_prune(params, specs, 0.1, support=ap.find_state(opt_state).support)
tx = optax.chain(optax.sgd(0.02, momentum=0.9), ap.keep_masked(masks))
params, _ = fit(params, tx, tx.init(params))
print("kept widths:", [int(m.any(0).sum()) for m in (masks[0]["kernel"], masks[1]["kernel"])],
      "loss:", float(loss(params)))
