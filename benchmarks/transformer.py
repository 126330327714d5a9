"""A small transformer and a depthwise CNN: EKFAC, EKFAC-ra, KFAC, a hybrid, AdamW and Adam.

Three problems, each trained by every method over a grid, all runs of a problem in one process,
alternating epoch by epoch (``benchmarks/_training.py``):

- ``lm``: a next-character language model. A pre-LN transformer built from stock Flax linen
  modules: ``nn.Embed`` (tokens), a learned positional embedding (``self.param``), blocks of
  ``nn.LayerNorm`` -> causal ``nn.MultiHeadDotProductAttention`` -> residual, ``nn.LayerNorm`` ->
  ``nn.Dense`` (4x width) -> GELU -> ``nn.Dense`` -> residual, then a final ``nn.LayerNorm`` and an
  ``nn.Dense`` head. Text: the dataset descriptions that ship with scikit-learn
  (``sklearn/datasets/descr/*.rst``, concatenated in file-name order; the first 90% of the
  characters for training windows, the last 10% for validation windows), character vocabulary,
  random windows of ``seq + 1`` characters drawn once with a fixed seed.
- ``reverse``: the same transformer without the causal mask on random token sequences (length 16,
  16 symbols), trained to output the sequence reversed (target ``y_t = x_{T-1-t}``).
- ``cnn``: a small CNN on scikit-learn's 8x8 digits: 3x3 conv -> BatchNorm -> ReLU -> depthwise 3x3
  ``nn.Conv`` (``feature_group_count`` = channels) -> BatchNorm -> ReLU -> 1x1 conv -> BatchNorm ->
  ReLU -> 2x2 max-pool -> ``nn.Dense`` classifier. BatchNorm in training mode during the steps;
  losses are evaluated with its running averages (momentum 0.9).

The loss is the softmax cross-entropy (mean over examples and positions).

Methods. The Kronecker methods take their structure from the model:
``blocks = ek.find_blocks(loss_fn, params, *batch)`` (every layer the capture knows: Dense,
DenseGeneral inside the attention, Conv, grouped Conv, Embed, the LayerNorm / BatchNorm scales and
offsets) and ``fallback="diagonal"`` for whatever is left (the positional embedding).

- EKFAC: ``ek.scale_by_ekfac(blocks=blocks, scaling="batch")``;
- EKFAC-ra: ``ek.scale_by_ekfac(blocks=blocks, scaling="running")``;
- KFAC: ``ek.scale_by_kfac(blocks=blocks)``;
- Hybrid: ``optax.multi_transform`` with EKFAC (``scaling="batch"``) on the parameters of the
  Kronecker blocks only (``blocks`` restricted to ``block == "kronecker"``, ``fallback="identity"``,
  the same restricted dict given to ``ek.value_grad_and_stats(layers=...)``) and ``optax.adam`` on
  every other parameter (embeddings, norms, positional embedding). ``multi_transform`` hands each
  branch the full tree with the other branch's leaves replaced by ``optax.MaskedNode``; the EKFAC
  branch is wrapped (:func:`without_masked_nodes`) so that it sees a tree holding its own
  parameters only. ``multi_transform`` forwards the ``stats=`` keyword to both branches; Adam
  ignores it. The Adam branch's learning rate is the EKFAC branch's divided by 100.

each followed by ``optax.clip_by_global_norm(1.0)`` (the README's recipe; ``--no-clip`` drops it)
and ``optax.scale_by_learning_rate(lr)``; damping ``damping_mode="tikhonov"``, factor decay 0.95,
eigenbasis every 20 steps. AdamW is ``optax.adamw(lr, weight_decay=0.01)``, Adam ``optax.adam(lr)``.

Grid: learning rate x damping for the Kronecker methods and the hybrid, learning rate for AdamW and
Adam (defaults below); every run of a problem starts from the same parameters and sees the same
minibatches. The best run of each method is the one with the lowest final training loss. A run
whose training loss becomes NaN or Inf stops and counts as diverged (+inf); a run that raises is
caught, recorded as crashed and stops; the script itself never fails on a run.

Goals (stated in the summary with the numbers): (a) ``ek.summarize(params, blocks)`` lists no
parameter passed through as identity, for the transformer and the CNN; (b) EKFAC or EKFAC-ra
reaches AdamW's final training loss on the language model in at most 0.7x AdamW's steps; (c) no
configuration of the grid crashes.

Usage::

    python -m benchmarks.transformer [--quick] [--out DIR] [--tasks lm,reverse,cnn]
        [--methods ...] [--epochs E] [--no-clip]

writes ``transformer.csv``, ``transformer.png`` and ``transformer.md`` to ``--out`` (default
``benchmarks/results``). ``--quick`` (CI) runs tiny models on little data for one epoch with one
configuration per method.
"""

import csv
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import ekfac_optax as ek
from benchmarks._common import base_parser, comma_floats, machine_info
from benchmarks._training import (
    Compiled,
    Runner,
    best_by_method,
    config_string,
    final_loss,
    fmt_list,
    kronecker_tx,
    median_ms_per_step,
    train_alternated,
)

KRONECKER = ("EKFAC", "EKFAC-ra", "KFAC", "Hybrid")
FIRST_ORDER = ("AdamW", "Adam")
METHODS = KRONECKER + FIRST_ORDER
TASKS = ("lm", "reverse", "cnn")
# --quick (CI) compiles one Kronecker step only (15-45 s on this project's 2-core CPU, even for
# the tiny model): EKFAC and AdamW on the language model (goal (b)'s code), Adam on the others.
QUICK_METHODS = {"lm": ("EKFAC", "AdamW"), "reverse": ("Adam",), "cnn": ("Adam",)}
TASK_TITLES = {
    "lm": "character language model (transformer)",
    "reverse": "sequence reversal (transformer)",
    "cnn": "digits CNN with BatchNorm and a depthwise conv",
}
DEFAULT_LRS = (3.0, 1.0, 0.3)
DEFAULT_DAMPINGS = (1e-5, 1e-4, 1e-3)
DEFAULT_ADAM_LRS = (1e-2, 3e-3, 1e-3)
HYBRID_ADAM_RATIO = 0.01  # the hybrid's Adam learning rate is this times its EKFAC learning rate
ADAMW_WEIGHT_DECAY = 0.01
FACTOR_DECAY = 0.95
BASIS_UPDATE_EVERY = 20
BN_MOMENTUM = 0.9
STEP_RATIO_GOAL = 0.7
EVAL_CHUNK = 512
METRICS = ("train_loss", "val_loss", "train_acc", "val_acc")
NAN_METRICS = (math.nan,) * len(METRICS)

# Sizes: transformer (depth, width, heads), sequence lengths, CNN widths, examples, batch, epochs.
SIZES = {
    "full": dict(
        depth=2,
        width=64,
        heads=4,
        lm_seq=32,
        reverse_seq=16,
        reverse_vocab=16,
        cnn_widths=(16, 32),
        lm_train=1024,
        lm_val=256,
        reverse_train=1024,
        reverse_val=512,
        digits_train=None,
        digits_val=None,
        batch=dict(lm=32, reverse=32, cnn=64),
        epochs=dict(lm=8, reverse=8, cnn=10),
    ),  # fmt: skip
    "quick": dict(
        depth=1,
        width=16,
        heads=2,
        lm_seq=8,
        reverse_seq=8,
        reverse_vocab=8,
        cnn_widths=(4, 8),
        lm_train=64,
        lm_val=64,
        reverse_train=64,
        reverse_val=64,
        digits_train=64,
        digits_val=64,
        batch=dict(lm=32, reverse=32, cnn=32),
        epochs=dict(lm=1, reverse=1, cnn=1),
    ),  # fmt: skip
}


# --- Models ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        y = nn.LayerNorm(name="ln_attn")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm(name="ln_mlp")(x)
        y = nn.Dense(4 * self.width, name="mlp_in")(y)
        y = nn.Dense(self.width, name="mlp_out")(nn.gelu(y))
        return x + y


class Transformer(nn.Module):
    """Token embedding + learned positional embedding, pre-LN blocks, final LayerNorm, head."""

    vocab: int
    n_out: int
    seq: int
    depth: int
    width: int
    heads: int
    causal: bool

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        del train  # no dropout, no BatchNorm
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab, self.width, embedding_init=init, name="embed")(tokens)
        pos = self.param("pos_embed", init, (self.seq, self.width))
        x = x + pos[: tokens.shape[-1]]
        mask = nn.make_causal_mask(tokens) if self.causal else None
        for i in range(self.depth):
            x = Block(self.width, self.heads, name=f"block{i}")(x, mask)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.n_out, name="head")(x)


class DepthwiseCNN(nn.Module):
    """conv 3x3 -> BN -> ReLU -> depthwise conv 3x3 -> BN -> ReLU -> conv 1x1 -> BN -> ReLU ->
    max-pool 2x2 -> Dense classifier."""

    widths: tuple[int, int]
    n_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(y, name):
            return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name=name)(y)

        c, c_out = self.widths
        x = nn.relu(bn(nn.Conv(c, (3, 3), name="conv_in")(x), "bn_in"))
        x = nn.Conv(c, (3, 3), feature_group_count=c, name="depthwise")(x)
        x = nn.relu(bn(x, "bn_depthwise"))
        x = nn.relu(bn(nn.Conv(c_out, (1, 1), name="pointwise")(x), "bn_pointwise"))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.n_classes, name="classifier")(x.reshape(x.shape[0], -1))


# --- Data -----------------------------------------------------------------------------------------
def descr_text() -> tuple[str, list[str]]:
    """The scikit-learn dataset descriptions (``sklearn/datasets/descr/*.rst``), concatenated in
    file-name order, and the file names."""
    folder = resources.files("sklearn.datasets") / "descr"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst"))
    return "".join((folder / n).read_text(encoding="utf-8") for n in names), names


def windows(codes: np.ndarray, n: int, length: int, rng) -> np.ndarray:
    """``n`` windows of ``length`` consecutive entries of ``codes`` at random starts."""
    starts = rng.integers(0, len(codes) - length + 1, n)
    return codes[starts[:, None] + np.arange(length)[None, :]]


class Task(NamedTuple):
    name: str
    model: nn.Module
    variables: Any  # {"params": ...} (+ "batch_stats" for the CNN)
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    epochs: int
    batch: int
    desc: str
    data_desc: str


def lm_task(size: dict, seed: int) -> Task:
    text, names = descr_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    codes = np.array([index[c] for c in text], np.int32)
    split = int(0.9 * len(codes))
    seq = size["lm_seq"]
    rng = np.random.default_rng(seed)
    train = windows(codes[:split], size["lm_train"], seq + 1, rng)
    val = windows(codes[split:], size["lm_val"], seq + 1, rng)
    model = Transformer(len(chars), len(chars), seq, size["depth"], size["width"], size["heads"],
                        causal=True)  # fmt: skip
    data_desc = (
        f"scikit-learn {_sklearn_version()}'s dataset descriptions "
        f"(sklearn/datasets/descr/*.rst: {len(names)} files, {len(text):,} characters, "
        f"{len(chars)} distinct); {len(train)} training windows from the first 90% and "
        f"{len(val)} validation windows from the last 10%, {seq} input characters each"
    )
    return _task("lm", model, train[:, :-1], train[:, 1:], val[:, :-1], val[:, 1:], size, seed,
                 data_desc)  # fmt: skip


def reverse_task(size: dict, seed: int) -> Task:
    seq, vocab = size["reverse_seq"], size["reverse_vocab"]
    rng = np.random.default_rng(seed + 1)
    x_train = rng.integers(0, vocab, (size["reverse_train"], seq), dtype=np.int32)
    x_val = rng.integers(0, vocab, (size["reverse_val"], seq), dtype=np.int32)
    model = Transformer(vocab, vocab, seq, size["depth"], size["width"], size["heads"],
                        causal=False)  # fmt: skip
    data_desc = (
        f"uniform random sequences of {seq} tokens from {vocab} symbols, target the sequence "
        f"reversed; {len(x_train)} training / {len(x_val)} fresh validation sequences"
    )
    return _task("reverse", model, x_train, x_train[:, ::-1].copy(), x_val,
                 x_val[:, ::-1].copy(), size, seed, data_desc)  # fmt: skip


def cnn_task(size: dict, seed: int) -> Task:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = len(images) // 5
    train, val = order[n_val:], order[:n_val]
    if size["digits_train"]:
        train, val = train[: size["digits_train"]], val[: size["digits_val"]]
    mean, std = images[train].mean(), images[train].std() + 1e-8
    images = (images - mean) / std
    model = DepthwiseCNN(size["cnn_widths"])
    data_desc = (
        f"scikit-learn digits (8x8, one channel, standardised), {len(train)} training / "
        f"{len(val)} validation images"
    )
    return _task("cnn", model, images[train], labels[train], images[val], labels[val], size,
                 seed, data_desc)  # fmt: skip


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def initial_value(path: str, shape: tuple[int, ...], rng) -> np.ndarray:
    """The initial value of the variable at ``path`` (``/``-joined, collection first).

    Kernels LeCun-normal ``N(0, 1 / fan_in)`` (fan-in: every axis but the last; for the
    attention's query, key and value kernels ``(width, heads, head_dim)``, the first axis), as
    Flax's default; the token and positional embeddings ``N(0, 0.02²)``; biases, offsets and
    BatchNorm means zero; scales and BatchNorm variances one.
    """
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
        module = path.rsplit("/", 2)[-2]
        fan_in = shape[0] if module in ("query", "key", "value") else math.prod(shape[:-1])
        return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    if name in ("embedding", "pos_embed"):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if name in ("bias", "mean"):
        return np.zeros(shape, np.float32)
    if name in ("scale", "var"):
        return np.ones(shape, np.float32)
    raise ValueError(f"no initial value for {path}")


def init_variables(model: nn.Module, x0: np.ndarray, seed: int) -> dict:
    """The model's variables, drawn with numpy on the shapes of ``jax.eval_shape(model.init)``
    (no compilation of ``model.init``)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(x0))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(dict(shapes), sep="/")
    values = {k: jnp.asarray(initial_value(k, v.shape, rng)) for k, v in sorted(flat.items())}
    return traverse_util.unflatten_dict(values, sep="/")


def _task(name, model, x_train, y_train, x_val, y_val, size, seed, data_desc) -> Task:
    variables = init_variables(model, x_train[:1], seed)
    if isinstance(model, Transformer):
        mask = "causal mask" if model.causal else "no mask"
        desc = (f"pre-LN transformer: {model.depth} blocks, width {model.width}, {model.heads} "
                f"heads, MLP 4x width (GELU), sequence {model.seq}, vocabulary {model.vocab}, "
                f"{mask}")  # fmt: skip
    else:
        c, c_out = model.widths
        desc = (f"conv 3x3 ({c}) -> BN -> ReLU -> depthwise conv 3x3 ({c} groups) -> BN -> ReLU "
                f"-> conv 1x1 ({c_out}) -> BN -> ReLU -> max-pool 2x2 -> Dense(10)")  # fmt: skip
    n_params = sum(p.size for p in jax.tree.leaves(variables["params"]))
    desc += f"; {n_params:,} parameters"
    return Task(name, model, variables, (x_train, y_train), (x_val, y_val),
                size["epochs"][name], size["batch"][name], desc, data_desc)  # fmt: skip


# --- Losses ---------------------------------------------------------------------------------------
def has_batch_norm(task: Task) -> bool:
    return "batch_stats" in task.variables


def make_loss_fn(task: Task) -> Callable:
    """``loss_fn(params, batch_stats, x, y) -> (mean loss, new batch_stats)`` in training mode."""
    model = task.model

    def loss_fn(params, batch_stats, x, y):
        if batch_stats is None:
            logits, new = model.apply({"params": params}, x), None
        else:
            variables = {"params": params, "batch_stats": batch_stats}
            logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
            new = updated["batch_stats"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    return loss_fn


def make_evaluate(task: Task) -> Callable:
    """``evaluate(variables) -> (train loss, val loss, train acc, val acc)`` over whole sets
    (BatchNorm with its running averages); accuracy per token for the sequence tasks."""
    model = task.model

    @jax.jit
    def sums(variables, x, y):
        logits = model.apply(variables, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return losses.sum(), (jnp.argmax(logits, -1) == y).sum()

    def mean_loss_accuracy(variables, x, y):
        loss, correct = 0.0, 0
        for i in range(0, len(x), EVAL_CHUNK):
            chunk_loss, chunk_correct = sums(
                variables, x[i : i + EVAL_CHUNK], y[i : i + EVAL_CHUNK]
            )
            loss, correct = loss + float(chunk_loss), correct + int(chunk_correct)
        return loss / y.size, correct / y.size

    def evaluate(variables):
        train_loss, train_acc = mean_loss_accuracy(variables, *task.train)
        val_loss, val_acc = mean_loss_accuracy(variables, *task.val)
        return train_loss, val_loss, train_acc, val_acc

    return evaluate


def example_batch(task: Task, batch: int) -> tuple:
    return tuple(jnp.asarray(a[:batch]) for a in task.train)


def find_blocks(task: Task) -> dict:
    """``ek.find_blocks`` on the task's training loss and a minibatch."""
    loss_fn = make_loss_fn(task)
    variables = task.variables
    return ek.find_blocks(loss_fn, variables["params"], variables.get("batch_stats"),
                          *example_batch(task, task.batch))  # fmt: skip


def kronecker_only(blocks: dict) -> dict:
    return {p: s for p, s in blocks.items() if s.block == "kronecker"}


def identity_rows(summary_text: str) -> list[str]:
    """The rows of an ``ek.summarize`` table that say a parameter is passed through as identity."""
    return [line.strip() for line in summary_text.splitlines() if "identity" in line.lower()]


# --- The hybrid -----------------------------------------------------------------------------------
def without_masked_nodes(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to the leaves of a tree that are not ``optax.MaskedNode``.

    ``optax.multi_transform`` gives each branch the whole (nested-dict) parameter tree with the
    other branches' leaves replaced by ``MaskedNode``; this removes them before ``inner`` sees
    the tree (so ``inner`` gets a tree of its own parameters only) and puts them back in its
    output. Extra keyword arguments (``stats=``) go to ``inner`` unchanged.
    """
    inner = optax.with_extra_args_support(inner)

    def strip(tree):
        flat = traverse_util.flatten_dict(tree, sep="/")
        kept = {k: v for k, v in flat.items() if not isinstance(v, optax.MaskedNode)}
        return traverse_util.unflatten_dict(kept, sep="/")

    def init(params):
        return inner.init(strip(params))

    def update(updates, state, params=None, **extra_args):
        flat = traverse_util.flatten_dict(updates, sep="/")
        new, state = inner.update(
            strip(updates), state, None if params is None else strip(params), **extra_args
        )
        new_flat = traverse_util.flatten_dict(new, sep="/")
        merged = {k: new_flat.get(k, v) for k, v in flat.items()}
        return traverse_util.unflatten_dict(merged, sep="/"), state

    return optax.GradientTransformationExtraArgs(init, update)


def hybrid_labels(params, kron_blocks: dict) -> Any:
    """``"ekfac"`` for the parameters of a Kronecker block (its module path is a key of
    ``kron_blocks``), ``"adam"`` for every other parameter."""
    flat = traverse_util.flatten_dict(params, sep="/")
    labels = {k: "ekfac" if k.rsplit("/", 1)[0] in kron_blocks else "adam" for k in flat}
    return traverse_util.unflatten_dict(labels, sep="/")


# --- Optimizers -----------------------------------------------------------------------------------
def method_tx(method: str, blocks: dict, labels, lr, damping, clip: bool):
    """The transformation of a Kronecker method or the hybrid, for the given hyperparameters."""
    common = dict(factor_decay=FACTOR_DECAY, clip=clip)
    if method != "Hybrid":
        return kronecker_tx(method, blocks, lr, damping, BASIS_UPDATE_EVERY, **common)
    branch = kronecker_tx(
        "EKFAC", kronecker_only(blocks), lr, damping, BASIS_UPDATE_EVERY, fallback="identity",
        **common,
    )  # fmt: skip
    return optax.multi_transform(
        {"ekfac": without_masked_nodes(branch), "adam": optax.adam(HYBRID_ADAM_RATIO * lr)},
        labels,
    )


def first_order_tx(method: str, lr):
    if method == "AdamW":
        return optax.adamw(lr, weight_decay=ADAMW_WEIGHT_DECAY)
    return optax.adam(lr)


class Steps(Compiled):
    """The compiled steps of one task: ``hyper`` is ``(lr, damping)`` for the Kronecker methods
    and the hybrid, ``(lr,)`` for the others."""

    def __init__(self, task: Task, args):
        super().__init__()
        self.task, self.args = task, args
        self.loss_fn = make_loss_fn(task)
        self.evaluate_variables = make_evaluate(task)
        self._blocks = None

    @property
    def blocks(self) -> dict:
        if self._blocks is None:
            self._blocks = find_blocks(self.task)
        return self._blocks

    @property
    def labels(self):
        return hybrid_labels(self.task.variables["params"], kronecker_only(self.blocks))

    def make_tx(self, method: str, *hyper):
        if method in KRONECKER:
            return method_tx(method, self.blocks, self.labels, *hyper, self.args.clip)
        return first_order_tx(method, *hyper)

    def initial_variables(self, method: str) -> dict:
        return self.task.variables

    def evaluate(self, method: str, variables) -> tuple[float, ...]:
        return self.evaluate_variables(variables)

    def step(self, method: str) -> Callable:
        """``step(variables, opt_state, batch, *hyper) -> (variables, opt_state, loss)``."""
        return self.cached(method, lambda: self.build_step(method))

    def build_step(self, method: str) -> Callable:
        batch_norm = has_batch_norm(self.task)
        if method in KRONECKER:
            layers = kronecker_only(self.blocks) if method == "Hybrid" else None
            grad_fn = ek.value_grad_and_stats(self.loss_fn, has_aux=True, layers=layers)
        else:
            value_and_grad = jax.value_and_grad(self.loss_fn, has_aux=True)

            def grad_fn(params, batch_stats, x, y):
                return *value_and_grad(params, batch_stats, x, y), None

        @jax.jit
        def step(variables, opt_state, batch, *hyper):
            params = variables["params"]
            (loss, batch_stats), grads, stats = grad_fn(
                params, variables.get("batch_stats"), *batch
            )
            tx = self.make_tx(method, *hyper)
            if stats is None:
                updates, opt_state = tx.update(grads, opt_state, params)
            else:
                updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
            new = {"params": optax.apply_updates(params, updates)}
            if batch_norm:
                new["batch_stats"] = batch_stats
            return new, opt_state, loss

        return step


def make_runner(steps: Steps, method: str, lr: float, damping) -> Runner:
    if damping is None:
        return steps.runner(method, float(lr))
    return steps.runner(method, float(lr), float(damping))


def guarded(label: str, make: Callable[[], Runner], errors: dict) -> Runner:
    """A runner built lazily by ``make`` whose every exception is caught and recorded in
    ``errors[label]``; from then on its state is ``None``, its loss and metrics NaN (so
    ``train_alternated`` stops it)."""
    cell = {}

    def attempt(fn, fallback):
        if label in errors:
            return fallback
        try:
            if "runner" not in cell:
                cell["runner"] = make()
            return fn(cell["runner"])
        except Exception as e:  # noqa: BLE001 - a crashed run is a result, not a failure
            message = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            errors[label] = message[:400]
            print(f"\n{label} crashed:", file=sys.stderr)
            traceback.print_exc()
            return fallback

    def step(state, batch):
        if state is None:
            return None, math.nan
        return attempt(lambda r: jax.block_until_ready(r.step(state, batch)), (None, math.nan))

    def evaluate(state):
        if state is None:
            return NAN_METRICS
        return attempt(lambda r: tuple(float(m) for m in r.evaluate(state)), NAN_METRICS)

    return Runner(init=lambda: attempt(lambda r: r.init(), None), step=step, evaluate=evaluate)


# --- Runs -----------------------------------------------------------------------------------------
def methods_of(task: str, args) -> list[str]:
    """The methods run on a task: ``--methods``, or ``QUICK_METHODS`` under ``--quick``."""
    if args.methods is None:
        return list(QUICK_METHODS[task] if args.quick else METHODS)
    return args.methods


def grid(task: str, args) -> dict:
    g = {m: [(lr, d) for lr in args.lrs for d in args.dampings] for m in KRONECKER}
    g.update({m: [(lr, None) for lr in args.adam_lrs] for m in FIRST_ORDER})
    return {m: g[m] for m in methods_of(task, args)}


def structure(task: Task) -> dict:
    """``ek.find_blocks`` and ``ek.summarize`` of a task's model, and the goal (a) check."""
    try:
        blocks = find_blocks(task)
        text = ek.summarize(task.variables["params"], blocks, fallback="diagonal")
    except Exception as e:  # noqa: BLE001 - reported in the summary
        traceback.print_exc()
        return dict(error=f"{type(e).__name__}: {e}".splitlines()[0][:400], blocks={}, text="",
                    identity=None)  # fmt: skip
    counts = {}
    for spec in blocks.values():
        key = f"{spec.kind} ({spec.block}{', stacked' if spec.stack else ''})"
        counts[key] = counts.get(key, 0) + 1
    return dict(error=None, blocks=blocks, text=text, identity=identity_rows(text), counts=counts)


def run_task(task: Task, args) -> tuple[list[dict], dict]:
    steps = Steps(task, args)
    configs = [(m, lr, d) for m, pairs in grid(task.name, args).items() for lr, d in pairs]
    errors: dict[str, str] = {}
    labelled = []
    for m, lr, d in configs:
        label = f"{task.name} {m} lr={lr:.3g}" + ("" if d is None else f" damping={d:g}")
        make = lambda m=m, lr=lr, d=d: make_runner(steps, m, lr, d)  # noqa: E731
        labelled.append((label, guarded(label, make, errors)))
    histories = train_alternated(labelled, task.train, task.epochs, task.batch, args.seed)
    runs = []
    for (method, lr, damping), (label, _), history in zip(configs, labelled, histories,
                                                          strict=True):  # fmt: skip
        runs.append(dict(task=task.name, method=method, lr=lr, damping=damping, history=history,
                         error=errors.get(label)))  # fmt: skip
    return runs, dict(steps_per_epoch=len(task.train[0]) // task.batch)


def status(r: dict) -> str:
    if r["error"] is not None:
        return "crashed"
    h = r["history"]
    return "diverged" if not final_loss(h) <= h[0][2] else "ok"


# --- Figures of merit -----------------------------------------------------------------------------
def steps_to_reach(history, target: float, steps_per_epoch: int) -> int | None:
    """Steps at the end of the first epoch whose training loss is <= ``target``."""
    for row in history[1:]:
        if row[2] <= target:
            return row[0] * steps_per_epoch
    return None


def seconds_to_reach(history, target: float) -> float | None:
    for row in history[1:]:
        if row[2] <= target:
            return row[1]
    return None


def ms_per_step(runs, task: str, method: str, steps_per_epoch: int) -> float:
    histories = [r["history"] for r in runs if r["task"] == task and r["method"] == method]
    return median_ms_per_step(histories, steps_per_epoch)


# --- Plot -----------------------------------------------------------------------------------------
def plot(runs, tasks: dict, contexts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tasks)
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 4.3 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        ax_steps, ax_time = axes[row]
        spe = contexts[name]["steps_per_epoch"]
        best = best_by_method([r for r in runs if r["task"] == name])
        for method, r in best.items():
            h = np.array([x[:3] for x in r["history"]], dtype=float)
            if not np.isfinite(h[:, 2]).any():
                continue
            label = f"{method} ({config_string(r)})"
            ax_steps.plot(h[:, 0] * spe, h[:, 2], marker=".", label=label)
            ax_time.plot(h[1:, 1], h[1:, 2], marker=".", label=label)
        title = TASK_TITLES[name]
        ax_steps.set(xlabel="training steps", title=f"{title}: training loss vs steps")
        ax_time.set(xscale="log", xlabel="seconds of training steps (after compilation)",
                    title=f"{title}: training loss vs seconds")  # fmt: skip
        for ax in (ax_steps, ax_time):
            ax.set(yscale="log", ylabel="training loss (cross-entropy)")
            ax.grid(alpha=0.3, which="both")
        ax_steps.legend(fontsize=7)
    fig.suptitle("Best configuration per method (lowest final training loss)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Report ---------------------------------------------------------------------------------------
def holds(flag: bool | None) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "**not measured**"}[flag]


def goal_a(structures: dict) -> tuple[bool | None, str]:
    checked = {k: s for k, s in structures.items() if k in ("lm", "cnn")}
    if not checked:
        return None, "neither the transformer (lm) nor the CNN was run"
    parts, ok = [], True
    for name, s in checked.items():
        model = "transformer" if name == "lm" else "CNN"
        if s["error"]:
            parts.append(f"{model}: find_blocks/summarize raised {s['error']}")
            ok = False
        elif s["identity"]:
            parts.append(f"{model}: {len(s['identity'])} identity row(s): "
                         + "; ".join(f"`{r}`" for r in s["identity"]))  # fmt: skip
            ok = False
        else:
            n_rows = len([ln for ln in s["text"].splitlines() if ln.strip()])
            parts.append(f"{model}: no identity row in the {n_rows}-line summary")
    return ok, "; ".join(parts)


def goal_b(runs, contexts) -> tuple[bool | None, str]:
    if "lm" not in contexts:
        return None, "the language model was not run"
    spe = contexts["lm"]["steps_per_epoch"]
    best = best_by_method([r for r in runs if r["task"] == "lm"])
    adamw = best.get("AdamW")
    if adamw is None or not math.isfinite(final_loss(adamw["history"])):
        return None, "AdamW has no finite final loss on the language model"
    target = final_loss(adamw["history"])
    adamw_steps = adamw["history"][-1][0] * spe
    parts, ok = [], False
    for method in ("EKFAC", "EKFAC-ra"):
        r = best.get(method)
        if r is None:
            continue
        steps = steps_to_reach(r["history"], target, spe)
        if steps is None:
            parts.append(f"{method} ({config_string(r)}) never reached it "
                         f"(its final loss {final_loss(r['history']):.4f})")  # fmt: skip
            continue
        ratio = steps / adamw_steps
        ok = ok or ratio <= STEP_RATIO_GOAL
        parts.append(f"{method} ({config_string(r)}) reached it after {steps} steps = "
                     f"{ratio:.2f}x AdamW's")  # fmt: skip
    if not parts:
        return None, "neither EKFAC nor EKFAC-ra was run"
    head = f"AdamW ({config_string(adamw)}) ends at {target:.4f} after {adamw_steps} steps; "
    return ok, head + "; ".join(parts) + f" (epoch resolution, {spe} steps)"


def goal_c(runs) -> tuple[bool, str]:
    crashed = [r for r in runs if r["error"] is not None]
    diverged = [r for r in runs if status(r) == "diverged"]
    text = f"{len(crashed)} of {len(runs)} runs crashed, {len(diverged)} diverged (not crashes)"
    if crashed:
        text += ": " + "; ".join(f"{r['task']} {r['method']} {config_string(r)}: {r['error']}"
                                 for r in crashed[:10])  # fmt: skip
    return not crashed, text


def task_section(name: str, task: Task, runs, context, struct) -> list[str]:
    spe = context["steps_per_epoch"]
    mine = [r for r in runs if r["task"] == name]
    best = best_by_method(mine)
    base = "Adam" if "Adam" in best else "AdamW"
    base_ms = ms_per_step(runs, name, base, spe)
    adamw = best.get("AdamW")
    target = final_loss(adamw["history"]) if adamw else math.nan
    adamw_steps = adamw["history"][-1][0] * spe if adamw else math.nan
    lines = [
        "",
        f"## {name}: {TASK_TITLES[name]}",
        "",
        f"Model: {task.desc}.  ",
        f"Data: {task.data_desc}. Minibatch {task.batch}, {task.epochs} epochs of {spe} steps "
        f"({task.epochs * spe} steps).",
        "",
    ]
    if struct["error"]:
        lines.append(f"`ek.find_blocks` / `ek.summarize` raised: {struct['error']}")
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(struct["counts"].items()))
        summary_title = 'ek.summarize(params, blocks, fallback="diagonal")'
        lines += [
            f"Blocks found by `ek.find_blocks`: {len(struct['blocks'])} ({kinds}).",
            "",
            f"<details><summary>{summary_title}</summary>",
            "",
            "```",
            struct["text"].rstrip(),
            "```",
            "",
            "</details>",
        ]
    lines += [
        "",
        "| method | best config | train loss | val loss | train acc | val acc | steps to AdamW's "
        f"final loss | time (s) | ms/step | step time / {base}'s | diverged | crashed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, r in best.items():
        h = r["history"][-1]
        grid_runs = [g for g in mine if g["method"] == method]
        n_div = sum(status(g) == "diverged" for g in grid_runs)
        n_crash = sum(status(g) == "crashed" for g in grid_runs)
        ms = ms_per_step(runs, name, method, spe)
        reach = steps_to_reach(r["history"], target, spe) if adamw else None
        reach_s = "never" if reach is None else f"{reach} ({reach / adamw_steps:.2f}x)"
        if not math.isfinite(final_loss(r["history"])):
            lines.append(f"| {method} | (every run diverged or crashed) | | | | | | | | | "
                         f"{n_div}/{len(grid_runs)} | {n_crash}/{len(grid_runs)} |")  # fmt: skip
            continue
        lines.append(
            f"| {method} | {config_string(r)} | {h[2]:.4f} | {h[3]:.4f} | {h[4]:.3f} | "
            f"{h[5]:.3f} | {reach_s} | {h[1]:.2f} | {ms:.2f} | {ms / base_ms:.2f} | "
            f"{n_div}/{len(grid_runs)} | {n_crash}/{len(grid_runs)} |"
        )
    lines += [
        "",
        "Steps to AdamW's final loss: the first evaluated step (end of an epoch) at which the "
        "method's best run has a training loss at or below the final training loss of AdamW's "
        "best run, and that as a fraction of AdamW's steps. ms/step: median over every epoch of "
        "the method's runs; time: the best run's training seconds. Diverged: final training loss "
        "NaN, Inf or above the initial loss.",
    ]
    errors = [r for r in mine if r["error"]]
    if errors:
        lines += ["", "Crashed runs:", ""]
        lines += [f"- {r['method']} {config_string(r)}: `{r['error']}`" for r in errors]
    return lines


def summary(runs, tasks, contexts, structures, args, command, wall) -> str:
    load = os.getloadavg()
    ok_a, text_a = goal_a(structures)
    ok_b, text_b = goal_b(runs, contexts)
    ok_c, text_c = goal_c(runs)
    n_kron = len(args.lrs) * len(args.dampings)
    clip = "`optax.clip_by_global_norm(1.0)` then " if args.clip else ""
    lines = [
        "# A small transformer and a depthwise CNN: EKFAC, EKFAC-ra, KFAC, hybrid, AdamW, Adam",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}  ",
        f"Total wall time (compilation and evaluation included): {wall:.0f} s  ",
        f"Load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in load)} on "
        f"{os.cpu_count()} cores.",
        "",
        "## Goals",
        "",
        f"- Goal (a), `ek.summarize` lists no identity parameter on the transformer and the CNN: "
        f"{holds(ok_a)} ({text_a}).",
        f"- Goal (b), EKFAC or EKFAC-ra reaches AdamW's final training loss on the language model "
        f"in <= {STEP_RATIO_GOAL}x AdamW's steps: {holds(ok_b)} ({text_b}).",
        f"- Goal (c), no configuration of the grid crashes: {holds(ok_c)} ({text_c}).",
        "",
        "## Methods and grid",
        "",
        "- Structure: `blocks = ek.find_blocks(loss_fn, params, batch_stats, x, y)` on the "
        "training loss (full coverage: Dense, the attention's DenseGeneral, Conv, grouped Conv, "
        'Embed, LayerNorm/BatchNorm scale and offset), `fallback="diagonal"` for the rest.',
        f'- EKFAC: `ek.scale_by_ekfac(blocks=blocks, scaling="batch")`; EKFAC-ra: the same with '
        f'`scaling="running"`; KFAC: `ek.scale_by_kfac(blocks=blocks)`; each with damping ε, '
        f'`damping_mode="tikhonov"`, `factor_decay={FACTOR_DECAY}`, '
        f"`basis_update_every={BASIS_UPDATE_EVERY}`, then {clip}"
        "`optax.scale_by_learning_rate(lr)`.",
        '- Hybrid: `optax.multi_transform({"ekfac": ..., "adam": optax.adam(lr / 100)}, '
        'labels)`, labels `"ekfac"` for the kernels and biases of the Kronecker blocks '
        '(`{p: s for p, s in blocks.items() if s.block == "kronecker"}`), `"adam"` for every '
        "other parameter; the EKFAC branch is `ek.scale_by_ekfac(blocks=kronecker_blocks, "
        f'fallback="identity")` with the same ε, then {clip}the learning rate, wrapped so that '
        "it sees only its own parameters (the `optax.MaskedNode` leaves removed); its `stats` "
        "come from `ek.value_grad_and_stats(loss_fn, layers=kronecker_blocks)` and reach it "
        "through `multi_transform`'s extra arguments.",
        f"- AdamW: `optax.adamw(lr, weight_decay={ADAMW_WEIGHT_DECAY})`; Adam: `optax.adam(lr)`.",
        f"- Grid: EKFAC, EKFAC-ra, KFAC, Hybrid: learning rate ∈ {fmt_list(args.lrs)} × damping "
        f"∈ {fmt_list(args.dampings)} ({n_kron} configurations); AdamW, Adam: learning rate ∈ "
        f"{fmt_list(args.adam_lrs)}. Methods run: "
        + "; ".join(f"{t}: {', '.join(methods_of(t, args))}" for t in tasks)
        + ".",
        "- Selection: lowest training loss after the last epoch (on the whole training set; a "
        "run whose loss becomes NaN or Inf stops there and counts as +inf). Every run of a "
        "problem starts from the same parameters and sees the same minibatches; all runs of a "
        "problem train in one process, alternating epoch by epoch, so every method sees the same "
        "machine load. Seconds are the training steps only, after compilation.",
    ]
    for name, task in tasks.items():
        lines += task_section(name, task, runs, contexts[name], structures[name])
    lines += [
        "",
        "These are the measurements of this run only: one seed, a small grid, a machine shared "
        "with other work (see the load average).",
        "",
        "Figure: `transformer.png` (training loss vs steps and vs seconds, one row per problem, "
        "best configuration per method); every run's per-epoch metrics are in `transformer.csv`.",
        "",
    ]
    return "\n".join(lines)


# --- Entry point ----------------------------------------------------------------------------------
def parse_args(argv):
    parser = base_parser(__doc__, quick="CI: tiny models, little data, 1 epoch, 1 config")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of lm, reverse, cnn")
    parser.add_argument("--methods", default=None,
                        help=f"comma list of {', '.join(METHODS)} (default all)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every task")
    parser.add_argument("--lrs", default=None, help="Kronecker learning rates (3,1,0.3)")
    parser.add_argument("--dampings", default=None, help="comma list (0.00001,0.0001,0.001)")
    parser.add_argument("--adam-lrs", default=None, help="comma list (0.01,0.003,0.001)")
    parser.add_argument("--no-clip", dest="clip", action="store_false",
                        help="no clip_by_global_norm(1.0) in the Kronecker methods")  # fmt: skip
    args = parser.parse_args(argv)

    def floats(text, default, quick):
        return comma_floats(text, [quick] if args.quick else default)

    args.lrs = floats(args.lrs, DEFAULT_LRS, 0.1)
    args.dampings = floats(args.dampings, DEFAULT_DAMPINGS, 1e-2)
    args.adam_lrs = floats(args.adam_lrs, DEFAULT_ADAM_LRS, 1e-3)
    args.tasks = [t.strip() for t in args.tasks.split(",")]
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",")]
    for values, allowed, what in ((args.tasks, TASKS, "tasks"), (args.methods or [], METHODS,
                                                                 "methods")):  # fmt: skip
        unknown = set(values) - set(allowed)
        if unknown:
            parser.error(f"unknown {what} {sorted(unknown)}; choose from {allowed}")
    args.size = dict(SIZES["quick" if args.quick else "full"])
    if args.epochs:
        args.size["epochs"] = {t: args.epochs for t in TASKS}
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, writes CSV, PNG and Markdown; returns the paths, runs and checks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    builders = {"lm": lm_task, "reverse": reverse_task, "cnn": cnn_task}
    tasks, contexts, structures, runs = {}, {}, {}, []
    for name in args.tasks:
        task = builders[name](args.size, args.seed)
        tasks[name] = task
        structures[name] = structure(task)
        s = structures[name]
        if name in ("lm", "cnn"):
            model = "transformer" if name == "lm" else "CNN"
            verdict = ("error: " + s["error"]) if s["error"] else (
                f"{len(s['identity'])} identity rows" + (": " + "; ".join(s["identity"])
                                                         if s["identity"] else ""))  # fmt: skip
            print(f"goal (a) check, {model}: ek.summarize -> {verdict}", file=sys.stderr)
        task_runs, contexts[name] = run_task(task, args)
        runs += task_runs
    wall = time.perf_counter() - start

    paths = {k: out / f"transformer.{k}" for k in ("csv", "png", "md")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("task", "method", "lr", "damping", "status", "epoch", "step", "seconds",
                         *METRICS))  # fmt: skip
        for r in runs:
            damping = "" if r["damping"] is None else repr(r["damping"])
            spe = contexts[r["task"]]["steps_per_epoch"]
            for epoch, seconds, *metrics in r["history"]:
                row = (r["task"], r["method"], repr(r["lr"]), damping, status(r), epoch,
                       epoch * spe, f"{seconds:.4f}")  # fmt: skip
                writer.writerow(row + tuple(repr(float(m)) for m in metrics))
    plot(runs, tasks, contexts, paths["png"])
    command = " ".join(["python -m benchmarks.transformer", *argv])
    text = summary(runs, tasks, contexts, structures, args, command, wall)
    paths["md"].write_text(text)
    print(text)
    return dict(paths=paths, runs=runs, structures=structures, contexts=contexts)


if __name__ == "__main__":
    main()
