"""Models of realistic width (64) trained for a few EKFAC steps across a basis refresh, one per
process: ``python tests/stress_models.py NAME`` prints one JSON line ``{"losses": [...],
"skipped": k}`` and exits 0. ``tests/test_hangs.py`` runs each under a timeout, so that a hang
(issue 34: a deadlock of batched LAPACK kernels in XLA's CPU thread pool) fails a test instead of
blocking the suite.

Each layer-kind family is here as linen, scanned (``nn.scan`` over identical blocks, one also
with ``nn.remat`` inside) and NNX (``nnx.Optimizer`` under ``nnx.jit``; the transformer is the
model of ``notebooks/05_nnx_and_transformers.ipynb`` at width 64). Float32, JAX's default
configuration and device count: the way a user runs them.
"""

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from helpers import classifier_loss, cross_entropy, train, train_step

import ekfac_optax as ek

WIDTH, HIDDEN, HEADS, LENGTH, BATCH, VOCAB, CLASSES = 64, 256, 4, 16, 32, 80, 10
STEPS, BASIS_EVERY = 4, 2  # bases computed on updates 0 and 2
LEARNING_RATE, DAMPING = 0.01, 0.1


# --- linen ----------------------------------------------------------------------------------------


class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Dense(WIDTH)(nn.relu(nn.Dense(HIDDEN)(x))), None


class ConvBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Conv(WIDTH, (3, 3))(nn.relu(nn.Conv(WIDTH, (3, 3))(x))), None


class TransformerBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(HEADS)(h, h, mask=nn.make_causal_mask(x[..., 0]))
        return x + nn.Dense(WIDTH)(nn.gelu(nn.Dense(HIDDEN)(nn.LayerNorm()(x)))), None


def stacked(block: type[nn.Module], scanned: bool, remat: bool = False, layers: int = 4):
    """``layers`` copies of ``block``: written out, or one ``nn.scan`` (of ``nn.remat``)."""

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            if not scanned:
                for _ in range(layers):
                    x, _ = block()(x)
                return x
            body = nn.remat(block) if remat else block
            scan = nn.scan(
                body, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers
            )
            return scan()(x, None)[0]

    return Stack


class LinenMlp(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, x):
        x = stacked(MlpBlock, self.scanned)()(nn.Dense(WIDTH)(x))
        return nn.Dense(CLASSES)(x)


class LinenCnn(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, x):
        x = stacked(ConvBlock, self.scanned, layers=2)()(nn.Conv(WIDTH, (3, 3))(x))
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


class LinenTransformer(nn.Module):
    scanned: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, WIDTH)(ids)
        layers = 4 if self.scanned else 2  # unrolled: 2, to bound the compile time
        x = stacked(TransformerBlock, self.scanned, self.remat, layers)()(x)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


# --- NNX ------------------------------------------------------------------------------------------


class NnxMlp(nnx.Module):
    def __init__(self, rngs, layers=4):
        self.stem = nnx.Linear(32, WIDTH, rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(WIDTH, HIDDEN, rngs=rngs) for _ in range(layers)])
        self.out = nnx.List([nnx.Linear(HIDDEN, WIDTH, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for hidden, out in zip(self.hidden, self.out, strict=True):
            x = x + out(nnx.relu(hidden(x)))
        return self.head(x)


class NnxCnn(nnx.Module):
    def __init__(self, rngs, layers=2):
        self.stem = nnx.Conv(3, WIDTH, (3, 3), rngs=rngs)
        self.convs = nnx.List(
            [nnx.Conv(WIDTH, WIDTH, (3, 3), rngs=rngs) for _ in range(2 * layers)]
        )
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for first, second in zip(self.convs[::2], self.convs[1::2], strict=True):
            x = x + second(nnx.relu(first(x)))
        return self.head(x.mean(axis=(1, 2)))


class NnxBlock(nnx.Module):  # notebook 05's block
    def __init__(self, rngs):
        self.ln_attention = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.mlp_in = nnx.Linear(WIDTH, 4 * WIDTH, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attention(self.ln_attention(x), mask=mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))


class NnxTransformer(nnx.Module):  # notebook 05's model: nnx.vmap-built blocks, nnx.scan
    def __init__(self, rngs, layers=2):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (LENGTH, WIDTH)))

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return NnxBlock(rngs)

        self.blocks = make_blocks(rngs)
        self.ln_final = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, ids):
        mask = nnx.make_causal_mask(ids)
        x = self.embed(ids) + self.positions[...]

        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
        def through(x, block, mask):
            return block(x, mask)

        return self.head(self.ln_final(through(x, self.blocks, mask)))


# --- Training -------------------------------------------------------------------------------------


def batch(family: str):
    rng = np.random.default_rng(0)
    if family == "mlp":
        x = rng.normal(size=(BATCH, 32))
        return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, CLASSES, BATCH))
    if family == "cnn":
        x = rng.normal(size=(BATCH, 8, 8, 3))
        return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, CLASSES, BATCH))
    ids = rng.integers(0, VOCAB, (BATCH, LENGTH + 1))
    return jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)


def optimizer(blocks):
    return ek.ekfac(LEARNING_RATE, blocks=blocks, damping=DAMPING, basis_update_every=BASIS_EVERY)


def skipped(state) -> int:
    """``skipped`` of the EKFAC state inside an optimizer state."""
    return int(optax.tree_utils.tree_get(state, "skipped"))


def train_linen(model: nn.Module, family: str) -> dict:
    x, y = batch(family)
    params = model.init(jax.random.key(0), x)["params"]
    loss_fn = classifier_loss(model)
    tx = optimizer(ek.find_blocks(loss_fn, params, x, y))
    _, state, losses = train(train_step(loss_fn, tx), params, tx.init(params), [(x, y)] * STEPS)
    return {"losses": losses, "skipped": skipped(state)}


def train_nnx(model: nnx.Module, family: str) -> dict:
    x, y = batch(family)

    def loss_fn(model, x, y):
        return cross_entropy(model(x), y)

    opt = nnx.Optimizer(model, optimizer(ek.find_blocks(loss_fn, model, x, y)), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads, stats = ek.value_grad_and_stats(loss_fn)(model, x, y)
        opt.update(model, grads, stats=stats)
        return loss

    losses = [float(step(model, opt, x, y)) for _ in range(STEPS)]
    return {"losses": losses, "skipped": skipped(nnx.to_pure_dict(nnx.state(opt, nnx.OptState)))}


MODELS = {
    "mlp": lambda: train_linen(LinenMlp(), "mlp"),
    "scanned_mlp": lambda: train_linen(LinenMlp(scanned=True), "mlp"),
    "nnx_mlp": lambda: train_nnx(NnxMlp(nnx.Rngs(0)), "mlp"),
    "cnn": lambda: train_linen(LinenCnn(), "cnn"),
    "scanned_cnn": lambda: train_linen(LinenCnn(scanned=True), "cnn"),
    "nnx_cnn": lambda: train_nnx(NnxCnn(nnx.Rngs(0)), "cnn"),
    "transformer": lambda: train_linen(LinenTransformer(), "lm"),
    "scanned_transformer": lambda: train_linen(LinenTransformer(scanned=True), "lm"),
    "scanned_remat_transformer": lambda: train_linen(
        LinenTransformer(scanned=True, remat=True), "lm"
    ),
    "nnx_transformer": lambda: train_nnx(NnxTransformer(nnx.Rngs(0)), "lm"),
}

if __name__ == "__main__":
    print(json.dumps(MODELS[sys.argv[1]]()))
