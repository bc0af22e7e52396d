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
