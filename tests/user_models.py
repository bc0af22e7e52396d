"""Models written the way users write them, outside admmprune's zoo (imported by tests and by
``python -m admmprune.export --like user_models:...``)."""

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """A pre-norm decoder block: causal attention and a GELU MLP, each with dropout."""

    def __init__(self, d: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, dropout_rate=0.1, decode=False, rngs=rngs)
        self.norm2 = nnx.RMSNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x, mask, *, deterministic=None):
        x = x + self.attn(self.norm1(x), mask=mask, deterministic=deterministic)
        return x + self.drop(self.down(nnx.gelu(self.up(self.norm2(x)))), deterministic=deterministic)


class GPT(nnx.Module):
    """A small decoder-only language model; ``__call__`` takes a keyword beyond the tokens."""

    def __init__(self, vocab=32, d=16, heads=4, hidden=32, layers=2, seq=8, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
        self.blocks = nnx.List([Block(d, heads, hidden, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens, *, deterministic=None):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask, deterministic=deterministic)
        return self.head(self.norm(x))


def build_gpt():
    return GPT(rngs=nnx.Rngs(0))


def call_gpt(model, tokens):
    return model(tokens, deterministic=True)


class CNN(nnx.Module):
    """Conv-BatchNorm-ReLU twice, a residual, global pooling and a dense head."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.relu(h + self.bn2(self.conv2(h)))
        return self.fc(jnp.mean(h, axis=(1, 2)))


def build_cnn():
    return CNN(rngs=nnx.Rngs(0))


class Layers(nnx.Module):
    """One of each other Flax layer kind in a prunable group: Conv, ConvTranspose, a per-channel
    GroupNorm, LinearGeneral with an outer and an inner output axis, Einsum, and Linear."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 6, (3, 3), rngs=rngs)
        self.up = nnx.ConvTranspose(6, 6, (2, 2), strides=(2, 2), rngs=rngs)
        self.norm = nnx.GroupNorm(6, num_groups=6, rngs=rngs)
        self.split = nnx.LinearGeneral(6, (3, 4), rngs=rngs)  # 3 outer units of 4
        self.merge = nnx.LinearGeneral((3, 4), 5, axis=(-2, -1), rngs=rngs)
        self.e1 = nnx.Einsum("bd,df->bf", (5, 8), (8,), rngs=rngs)
        self.e2 = nnx.Einsum("bf,fo->bo", (8, 7), (7,), rngs=rngs)
        self.head = nnx.Linear(7, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.norm(self.up(nnx.relu(self.conv(x)))))
        h = nnx.gelu(self.merge(nnx.gelu(self.split(jnp.mean(h, axis=(1, 2))))))
        return self.head(nnx.relu(self.e2(nnx.relu(self.e1(h)))))


def build_layers():
    return Layers(rngs=nnx.Rngs(0))
