"""Convolutional networks: EKFAC-ra vs KFAC vs SGD and SGD+BN (George et al. 2018, §4.2).

The paper trains a VGG11 and a ResNet34 without BatchNorm on CIFAR-10 with EKFAC-ra and KFAC, and
compares them with SGD with momentum, with and without BatchNorm. Here two architectures, each in a
variant without normalisation (trained by every method) and one with ``nn.BatchNorm`` after each
convolution (the "SGD+BN" baseline):

- VGG-style: stages of 3x3 convolutions (SAME padding, ReLU), a 2x2 max-pool after each stage, a
  linear classifier on the flattened features.
- ResNet: a 3x3 stem, basic residual blocks ``relu(x + conv(relu(conv(x))))`` (a 1x1 projection on
  the shortcut where the width or the stride changes), global average pooling, a linear
  classifier.

Data: CIFAR-10 when ``--cifar-dir`` holds the standard python batches (``data_batch_1`` to
``data_batch_5`` for training, ``test_batch`` for validation), with VGG11 (64-128-256x2-512x2-512x2)
and ResNet34 (64, 3-4-6-3 blocks of 64-128-256-512) as in the paper (``--small`` takes the small
models instead). Otherwise scikit-learn's bundled 8x8 digits (1797 images, one channel; 20% held
out for validation; ``--digits-size 16`` resizes them bilinearly with ``jax.image.resize``, at four
times the cost) with small models: VGG 16-16 / 32-32 (two stages) and a ResNet with a 16-channel
stem and one block per stage at widths 16 and 32. Pixels are standardised with the training set's
per-channel mean and standard deviation. The loss is the softmax cross-entropy over the 10
classes, mean over the batch.

Initialisation. The paper's Appendix B describes how its ResNet without BatchNorm is initialised;
its text was not available when this benchmark was written, so this uses the standard choice for
residual networks without normalisation instead: He-normal kernels (``N(0, 2 / fan_in)``) for
every convolution, zero biases, LeCun-normal (``N(0, 1 / fan_in)``) for the classifier (the same
in the VGG), and the last convolution of each residual branch initialised to zero, so that each
block is the identity at initialisation (as in Fixup, Zhang et al. 2019, and SkipInit, De & Smith
2020). The BatchNorm variants share every parameter with the plain ones except those zero
kernels, which get He-normal weights, with the scale of the branch's last BatchNorm set to zero
instead (Goyal et al. 2017): the same identity blocks at initialisation.

Methods and damping. EKFAC-ra is ``ek.ekfac(scaling="running")``, KFAC is ``ek.kfac``; both use
the SUA (KFC) statistics of the convolutions, a factor EMA decay of 0.95 and the library's
``damping_mode="factored"``, which its docstrings give as the paper's Appendix C: the denominator
``s + ε + √ε (T S_A ⊕ S_B)`` in the Kronecker-factored eigenbasis, which for KFAC is exactly
``((T A + √ε I) ⊗ (B + √ε I))⁻¹`` (``T`` = output positions per example) and gives EKFAC-ra the
same damping terms around its own scalings. It has no π rebalancing between the factors (the
authors' PyTorch KFAC has it as an option). ``--ekfac-damping-mode tikhonov`` gives EKFAC-ra
``s + ε`` instead (what the authors' PyTorch EKFAC does). SGD (``optax.sgd``, momentum 0.9) trains
the plain model, SGD+BN the BatchNorm one (BatchNorm momentum 0.9; its losses use the running
averages, as at test time).

Grid: EKFAC-ra and KFAC search learning rate × damping; SGD and SGD+BN search the learning rate
only, over as many values as the Kronecker grid has configurations (log-spaced over the same
range), so every method gets the same number of runs. The best configuration of each method is the
one with the lowest final training loss (a run whose loss becomes NaN or Inf stops and counts as
+inf; the report counts as diverged the runs that end NaN, Inf or above their initial loss, since
the library skips non-finite updates and a diverging KFAC can stall on a huge finite loss). Every
run of an architecture starts from the same parameters and sees the same minibatches.
Defaults: learning rate ∈ {1, 0.1, 0.01} × damping ∈ {0.1, 0.01, 0.001} (SGD: 9 rates from 1 to
0.01), minibatch 128, 20 epochs, eigenbasis recomputed every 10 steps; about 7 minutes on one core
for the digits. (With rates {0.1, 0.01, 0.001}, every method's best rate was 0.1, the top of the
grid, hence the shift.)

Time is the wall-clock of the training steps only, after compilation (each method's step is
compiled and run twice on a throw-away copy of the state before the clock starts), including the
periodic eigendecompositions; the losses and accuracies evaluated at the end of each epoch are not
counted. All runs of an architecture train in one process, alternating epoch by epoch
(``benchmarks/_training.py``), so that every method sees the same machine load.

Usage::

    python -m benchmarks.convnets [--quick] [--cifar-dir DIR] [--small] [--digits-size 8]
        [--epochs E] [--archs VGG,ResNet] [--ekfac-damping-mode factored] [--out DIR]

writes ``convnets.csv``, ``convnets.png`` and ``convnets.md`` to ``--out`` (default
``benchmarks/results``). ``--quick`` (CI, about 20 s on one core, mostly compilation) runs tiny
models (one 8-channel conv stage; a stem and one block) on 256 digits for one epoch with one
configuration per method.
"""

import csv
import math
import os
import pickle
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from benchmarks._common import base_parser, comma_floats, machine_info
from benchmarks._training import (
    Problem,
    ProblemSteps,
    Runner,
    best_by_method,
    config_string,
    final_loss,
    find_blocks,
    fmt_list,
    kronecker_tx,
    median_ms_per_step,
    time_to_reach,
    train_alternated,
)

KRONECKER = ("EKFAC-ra", "KFAC")
FIRST_ORDER = ("SGD", "SGD+BN")
METHODS = KRONECKER + FIRST_ORDER
ARCHS = ("VGG", "ResNet")
DEFAULT_LRS = (1.0, 1e-1, 1e-2)
DEFAULT_DAMPINGS = (1e-1, 1e-2, 1e-3)
SGD_MOMENTUM = 0.9
FACTOR_DECAY = 0.95
BN_MOMENTUM = 0.9
N_CLASSES = 10
EVAL_CHUNK = 2048  # images per forward pass when evaluating the full training / validation set

# Widths per size: VGG stages (widths of the convs of each stage), ResNet (stem, ((width, blocks),
# ...)). "quick" keeps the number of Kronecker blocks (two eigendecompositions each, about 1 s of
# XLA compilation per block on one core) at its minimum for CI.
VGG_WIDTHS = {
    "quick": ((8,),),
    "small": ((16, 16), (32, 32)),
    "paper": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # VGG11
}
RESNET_WIDTHS = {
    "quick": (8, ((8, 1),)),
    "small": (16, ((16, 1), (32, 1))),
    "paper": (64, ((64, 3), (128, 4), (256, 6), (512, 3))),  # ResNet34
}


class Data(NamedTuple):
    train_x: np.ndarray  # (N, H, W, C) float32, standardised
    train_y: np.ndarray  # (N,) int32
    val_x: np.ndarray
    val_y: np.ndarray
    desc: str


# --- Data -----------------------------------------------------------------------------------------
def read_cifar10(cifar_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CIFAR-10 python batches as ``(train_x, train_y, test_x, test_y)``.

    Reads ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (pickled dicts with ``b"data"``,
    ``(n, 3072)`` uint8 rows, channel-major, and ``b"labels"``) from ``cifar_dir`` or its
    ``cifar-10-batches-py`` subfolder. Images are ``(n, 32, 32, 3)`` uint8, labels int32.
    """
    root = Path(cifar_dir)
    if not (root / "data_batch_1").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def load(name):
        path = root / name
        if not path.exists():
            raise FileNotFoundError(f"no {name} in {root} (CIFAR-10 python version expected)")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: b'data' has shape {data.shape}, expected (n, 3072)")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(batch[b"labels"], np.int32)

    train = [load(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = load("test_batch")
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y


def standardise(train_x: np.ndarray, val_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets standardised with the training set's per-channel mean and std, as float32."""
    train_x = train_x.astype(np.float32)
    mean = train_x.mean(axis=(0, 1, 2), dtype=np.float64)
    std = train_x.std(axis=(0, 1, 2), dtype=np.float64) + 1e-8
    norm = lambda x: ((x.astype(np.float64) - mean) / std).astype(np.float32)  # noqa: E731
    return norm(train_x), norm(val_x)


def load_data(args) -> Data:
    if args.cifar_dir:
        train_x, train_y, val_x, val_y = read_cifar10(args.cifar_dir)
        desc = f"CIFAR-10 from {args.cifar_dir} (validation: test_batch)"
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)
        size = args.digits_size
        if size != 8:
            images = jax.image.resize(images, (len(images), size, size), "bilinear")
            images = np.clip(np.asarray(images), 0.0, 1.0)
        images = images[..., None]
        labels = digits.target.astype(np.int32)
        order = np.random.default_rng(args.seed).permutation(len(images))
        n_val = len(images) // 5
        train, val = order[n_val:], order[:n_val]
        train_x, train_y, val_x, val_y = images[train], labels[train], images[val], labels[val]
        desc = "scikit-learn digits, 8x8"
        if size != 8:
            desc = f"scikit-learn digits resized bilinearly from 8x8 to {size}x{size}"
    if args.max_train and len(train_x) > args.max_train:
        train_x, train_y = train_x[: args.max_train], train_y[: args.max_train]
        desc += f" (first {args.max_train} training images only)"
    train_x, val_x = standardise(train_x, val_x)
    return Data(train_x, train_y, val_x, val_y, desc)


# --- Models ---------------------------------------------------------------------------------------
class VGG(nn.Module):
    """3x3 convolutions and ReLUs, a 2x2 max-pool after each stage, a linear classifier."""

    stages: tuple[tuple[int, ...], ...]
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        for s, widths in enumerate(self.stages):
            for c, width in enumerate(widths):
                x = nn.Conv(width, (3, 3), name=f"conv{s}_{c}")(x)
                if self.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train, momentum=BN_MOMENTUM, name=f"bn{s}_{c}"
                    )(x)
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(N_CLASSES, name="classifier")(x.reshape(x.shape[0], -1))


class BasicBlock(nn.Module):
    """``relu(shortcut(x) + conv_out(relu(conv_in(x))))``, BN after each conv if ``batch_norm``."""

    width: int
    strides: int = 1
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        def norm(y, name):
            if not self.batch_norm:
                return y
            return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name=name)(y)

        strides = (self.strides, self.strides)
        y = nn.relu(norm(nn.Conv(self.width, (3, 3), strides, name="conv_in")(x), "bn_in"))
        y = norm(nn.Conv(self.width, (3, 3), name="conv_out")(y), "bn_out")
        if self.strides != 1 or x.shape[-1] != self.width:
            x = norm(nn.Conv(self.width, (1, 1), strides, name="shortcut")(x), "bn_shortcut")
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A 3x3 stem, stages of basic blocks (stride 2 from the second stage), global average pool."""

    stem: int
    stages: tuple[tuple[int, int], ...]
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.stem, (3, 3), name="stem")(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name="bn_stem")(x)
        x = nn.relu(x)
        for s, (width, blocks) in enumerate(self.stages):
            for b in range(blocks):
                strides = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(width, strides, self.batch_norm, name=f"block{s}_{b}")(x, train)
        return nn.Dense(N_CLASSES, name="classifier")(x.mean(axis=(1, 2)))


def make_models(arch: str, size: str) -> tuple[nn.Module, nn.Module, str]:
    """``(plain model, BatchNorm model, description)`` of an architecture at a size."""
    if arch == "VGG":
        stages = VGG_WIDTHS[size]
        widths = " / ".join("-".join(map(str, s)) for s in stages)
        desc = f"3x3 convs {widths}, 2x2 max-pool after each stage, linear classifier"
        desc += " (VGG11)" if size == "paper" else ""
        return VGG(stages), VGG(stages, batch_norm=True), desc
    stem, stages = RESNET_WIDTHS[size]
    blocks = ", ".join(f"{b} of width {w}" for w, b in stages)
    desc = f"3x3 stem of width {stem}, basic blocks: {blocks}, global average pool"
    desc += " (ResNet34)" if size == "paper" else ""
    return ResNet(stem, stages), ResNet(stem, stages, batch_norm=True), desc


def initial_value(path: str, shape: tuple[int, ...], batch_norm: bool, rng) -> np.ndarray:
    """The initial value of the parameter or BatchNorm statistic at ``path`` (``/``-joined).

    Kernels: LeCun-normal ``N(0, 1 / fan_in)`` for the classifier, zero for a residual branch's
    last conv (``conv_out``) without BatchNorm, He-normal ``N(0, 2 / fan_in)`` otherwise (fan-in:
    every axis but the last). Biases zero. BatchNorm: scale one, but zero after ``conv_out``
    (``bn_out``); offset zero; running mean zero, running variance one.
    """
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
        if "conv_out" in path and not batch_norm:
            return np.zeros(shape, np.float32)
        gain = 1.0 if path.startswith("classifier") else 2.0
        std = math.sqrt(gain / math.prod(shape[:-1]))
        return (std * rng.standard_normal(shape)).astype(np.float32)
    if name in ("scale", "var"):
        return np.full(shape, 0.0 if "bn_out" in path else 1.0, np.float32)
    if name in ("bias", "mean"):
        return np.zeros(shape, np.float32)
    raise ValueError(f"no initial value for {path}")


def init_variables(model, bn_model, x0, seed: int) -> tuple[Any, Any]:
    """The plain model's params, and the BN model's variables sharing every plain parameter
    except the zero ``conv_out`` kernels (He-normal there, with a zero ``bn_out`` scale after).

    Drawn with numpy on the shapes of ``jax.eval_shape(model.init)``: one explicit scheme
    (:func:`initial_value`), and no compilation of JAX's random number generator per shape.
    """
    rng = np.random.default_rng(seed)

    def fill(tree, batch_norm):
        flat = traverse_util.flatten_dict(tree, sep="/")
        values = {k: initial_value(k, v.shape, batch_norm, rng) for k, v in flat.items()}
        return traverse_util.unflatten_dict(values, sep="/")

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x0)
    params = fill(shapes["params"], batch_norm=False)
    bn_shapes = jax.eval_shape(bn_model.init, jax.random.PRNGKey(0), x0)
    bn_params = traverse_util.flatten_dict(fill(bn_shapes["params"], True), sep="/")
    for k, v in traverse_util.flatten_dict(params, sep="/").items():
        if "conv_out" not in k:
            if bn_params[k].shape != v.shape:
                raise ValueError(f"{k}: {bn_params[k].shape} in the BN model, {v.shape} without")
            bn_params[k] = v
    bn_variables = {
        "params": traverse_util.unflatten_dict(bn_params, sep="/"),
        "batch_stats": fill(bn_shapes["batch_stats"], True),
    }
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, bn_variables)


def objective(logits, batch):
    """The training objective on a minibatch ``(x, y)``: mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


# --- Steps ----------------------------------------------------------------------------------------
class Steps(ProblemSteps):
    """The compiled steps of one architecture on ``problem.data`` (a :class:`Data`)."""

    kronecker_methods = KRONECKER
    bn_methods = ("SGD+BN",)

    def __init__(self, problem: Problem, args):
        super().__init__(problem, objective)
        self.args = args
        model, bn_model = problem.model, problem.bn_model

        def sums(logits, y):
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return losses.sum(), (jnp.argmax(logits, -1) == y).sum()

        self.plain_sums = jax.jit(lambda p, x, y: sums(model.apply({"params": p}, x), y))
        self.bn_sums = jax.jit(lambda v, x, y: sums(bn_model.apply(v, x), y))

    def kronecker_tx(self, method: str, lr, damping, every) -> optax.GradientTransformation:
        """KFAC with factored damping; EKFAC-ra with ``--ekfac-damping-mode``."""
        return kronecker_tx(
            method,
            self.problem.blocks,
            lr,
            damping,
            every,
            factor_decay=FACTOR_DECAY,
            kfac_damping_mode="factored",
            ekfac_damping_mode=self.args.ekfac_damping_mode,
        )

    def first_order_tx(self, method: str, lr) -> optax.GradientTransformation:
        return optax.sgd(lr, momentum=SGD_MOMENTUM)

    def metrics(self, variables, batch_norm: bool) -> tuple[float, float, float, float]:
        """Training loss, validation loss, training and validation accuracy."""
        sums_fn, data = self.bn_sums if batch_norm else self.plain_sums, self.problem.data
        train_loss, train_acc = self.mean_loss_accuracy(sums_fn, variables, data.train_x,
                                                        data.train_y)  # fmt: skip
        val_loss, val_acc = self.mean_loss_accuracy(sums_fn, variables, data.val_x, data.val_y)
        return train_loss, val_loss, train_acc, val_acc

    @staticmethod
    def mean_loss_accuracy(sums_fn, variables, x, y) -> tuple[float, float]:
        """Mean loss and accuracy over the whole of ``x``, in chunks of ``EVAL_CHUNK``."""
        loss, correct = 0.0, 0
        for i in range(0, len(x), EVAL_CHUNK):
            chunk = slice(i, i + EVAL_CHUNK)
            chunk_loss, chunk_correct = sums_fn(variables, x[chunk], y[chunk])
            loss, correct = loss + float(chunk_loss), correct + int(chunk_correct)
        return loss / len(x), correct / len(x)


def make_runner(steps: Steps, method: str, lr: float, damping, every: int) -> Runner:
    if method in KRONECKER:
        return steps.runner(method, float(lr), float(damping), int(every))
    return steps.runner(method, float(lr))


# --- Runs -----------------------------------------------------------------------------------------
def first_order_lrs(lrs: Sequence[float], n: int) -> list[float]:
    """``n`` learning rates log-spaced over the range of the Kronecker grid's ``lrs``."""
    if n == 1 or len(lrs) == 1:
        return [float(lrs[0])]
    return [float(v) for v in np.logspace(np.log10(max(lrs)), np.log10(min(lrs)), n)]


def diverged(history) -> bool:
    """Whether the final training loss is NaN, Inf or above the initial one. (The library skips
    updates with non-finite numbers, so a diverging KFAC can end on a huge but finite loss.)"""
    return final_loss(history) > history[0][2]


def run(args, data: Data) -> tuple[list[dict], dict]:
    """Every architecture × method × configuration; returns ``runs`` and a context dict."""
    n_configs = len(args.lrs) * len(args.dampings)
    grid = {m: [(lr, d) for lr in args.lrs for d in args.dampings] for m in KRONECKER}
    grid.update({m: [(lr, None) for lr in first_order_lrs(args.lrs, n_configs)]
                 for m in FIRST_ORDER})  # fmt: skip
    runs, archs = [], {}
    x0 = jnp.asarray(data.train_x[:1])
    for arch in args.archs:
        model, bn_model, desc = make_models(arch, args.size)
        params, bn_variables = init_variables(model, bn_model, x0, args.seed)
        n_params = sum(p.size for p in jax.tree.leaves(params))
        archs[arch] = dict(desc=desc, n_params=int(n_params))
        minibatch = (data.train_x[: args.batch], data.train_y[: args.batch])
        blocks = find_blocks(model, objective, params, minibatch)
        steps = Steps(Problem(model, bn_model, params, bn_variables, data, blocks), args)
        configs = [(m, lr, d) for m in METHODS for lr, d in grid[m]]
        labelled = [
            (
                f"{arch} {m} lr={lr:.3g}" + ("" if d is None else f" damping={d:g}"),
                make_runner(steps, m, lr, d, args.basis_update_every),
            )
            for m, lr, d in configs
        ]
        histories = train_alternated(
            labelled, (data.train_x, data.train_y), args.epochs, args.batch, args.seed
        )
        for (method, lr, damping), history in zip(configs, histories, strict=True):
            runs.append(dict(arch=arch, method=method, lr=lr, damping=damping,
                             history=history))  # fmt: skip
    context = dict(
        data_desc=data.desc,
        n_train=len(data.train_x),
        n_val=len(data.val_x),
        image_shape=tuple(data.train_x.shape[1:]),
        grid=grid,
        archs=archs,
    )
    return runs, context


# --- Figures of merit -----------------------------------------------------------------------------
def best_runs(runs, arch: str) -> dict:
    """The run of each method with the lowest final training loss, for one architecture."""
    return best_by_method([r for r in runs if r["arch"] == arch])


def ms_per_step(runs, arch: str, method: str, steps_per_epoch: int) -> float:
    histories = [r["history"] for r in runs if r["arch"] == arch and r["method"] == method]
    return median_ms_per_step(histories, steps_per_epoch)


def per_epoch_wins(a, b) -> tuple[int, int, bool]:
    """Epochs at which run ``a``'s training loss is below ``b``'s, the epochs compared, and
    whether ``a`` is below at the last epoch (a stopped run counts as +inf from then on)."""
    n = max(len(a["history"]), len(b["history"])) - 1

    def loss(r, e):
        h = r["history"]
        return h[e][2] if e < len(h) and math.isfinite(h[e][2]) else math.inf

    wins = sum(loss(a, e) < loss(b, e) for e in range(1, n + 1))
    return wins, n, loss(a, n) < loss(b, n)


# --- Plot -----------------------------------------------------------------------------------------
def plot(runs, context, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.archs), 2, figsize=(13, 4.5 * len(args.archs)),
                             squeeze=False)  # fmt: skip
    for row, arch in enumerate(args.archs):
        ax_epoch, ax_time = axes[row]
        for method, r in best_runs(runs, arch).items():
            h = np.array([x[:3] for x in r["history"]], dtype=float)
            label = f"{method} ({config_string(r)})"
            ax_epoch.plot(h[:, 0], h[:, 2], marker=".", label=label)
            ax_time.plot(h[1:, 1], h[1:, 2], marker=".", label=label)
        desc = context["archs"][arch]["desc"]
        ax_epoch.set(xlabel="epoch", title=f"{arch}: training loss vs epoch")
        ax_time.set(xscale="log", xlabel="wall-clock of the training steps after compilation (s)",
                    title=f"{arch}: training loss vs time")  # fmt: skip
        for ax in (ax_epoch, ax_time):
            ax.set(yscale="log", ylabel="training loss (cross-entropy)")
            ax.grid(alpha=0.3, which="both")
        ax_epoch.legend(fontsize=7, title=desc, title_fontsize=7)
    fig.suptitle(f"Best configuration per method; {context['data_desc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Report ---------------------------------------------------------------------------------------
def edge_line(runs, arch: str, best: dict) -> str:
    """Which best configurations lie on the edge of their grid (the optimum may be outside)."""
    notes, searched = [], False
    for method, r in best.items():
        grid = [g for g in runs if g["arch"] == arch and g["method"] == method]
        for key, name in (("lr", "learning rate"), ("damping", "damping")):
            values = sorted({g[key] for g in grid if g[key] is not None})
            searched = searched or len(values) > 1
            if len(values) > 1 and r[key] in (values[0], values[-1]):
                side = "largest" if r[key] == values[-1] else "smallest"
                notes.append(f"{method} ({name} {r[key]:g}, the {side} tried)")
    if not searched:
        return "- One configuration per method: nothing was searched."
    if not notes:
        return "- Every best configuration lies inside its grid."
    return (
        "- Best configurations on the edge of their grid, so a better one may lie outside it: "
        + "; ".join(notes)
        + "."
    )


def goal_lines(runs, arch: str, best: dict) -> list[str]:
    """Plain statements of what was measured: EKFAC-ra against each other method."""
    lines = []
    ra = best.get("EKFAC-ra")
    if ra is None:
        return ["- EKFAC-ra did not run."]
    for other in ("KFAC", "SGD", "SGD+BN"):
        r = best.get(other)
        if r is None:
            continue
        wins, n, last = per_epoch_wins(ra, r)
        target, other_time = final_loss(r["history"]), r["history"][-1][1]
        reach = time_to_reach(ra["history"], target)
        if reach is None:
            per_second = (f"EKFAC-ra never reached {other}'s final loss ({target:.4f}); "
                          f"{other} took {other_time:.2f} s")  # fmt: skip
            faster = False
        else:
            faster = reach < other_time
            per_second = (f"EKFAC-ra reached {other}'s final loss ({target:.4f}) after "
                          f"{reach:.2f} s, {other} after {other_time:.2f} s")  # fmt: skip
        lines.append(
            f"- EKFAC-ra vs {other}: lower training loss at {wins} of {n} epochs "
            f"({'including' if last else 'not'} the last) — per epoch: "
            f"**{'EKFAC-ra better' if last else f'{other} better or equal'}** at the end; per "
            f"second: **{'EKFAC-ra faster' if faster else f'{other} faster'}** ({per_second}; "
            "epoch resolution)."
        )
    return lines


def summary(runs, context, args, command, wall) -> str:
    n_configs = len(args.lrs) * len(args.dampings)
    steps_per_epoch = context["n_train"] // args.batch
    load = os.getloadavg()
    sgd_lrs = first_order_lrs(args.lrs, n_configs)
    lines = [
        "# Convolutional networks (George et al. 2018, §4.2): EKFAC-ra, KFAC, SGD, SGD+BN",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}  ",
        f"Total wall time of the benchmark (compilation and evaluation included): {wall:.0f} s  ",
        f"Load average (1, 5, 15 min) at the end, this benchmark's threads included: "
        f"{', '.join(f'{v:.1f}' for v in load)} on {os.cpu_count()} cores.",
        "",
        "## Setup",
        "",
        f"Data: {context['data_desc']}; {context['n_train']} training / {context['n_val']} "
        f"validation images of shape {context['image_shape']}, standardised per channel; "
        f"softmax cross-entropy over 10 classes, mean over the batch. Minibatch {args.batch}, "
        f"{args.epochs} epochs ({steps_per_epoch} steps per epoch), seed {args.seed}.",
        "",
    ]
    for arch in args.archs:
        info = context["archs"][arch]
        lines.append(f"- {arch}: {info['desc']}, {info['n_params']:,} parameters without BN.")
    lines += [
        "",
        "Initialisation: the paper's Appendix B text was not available; this uses He-normal "
        "convolutions, zero biases, a LeCun-normal classifier and, in the ResNet, the last "
        "convolution of each residual branch at zero (each block is the identity at "
        "initialisation, as in Fixup / SkipInit). The BatchNorm models share every parameter "
        "with the plain ones except those zero kernels (He-normal there, with a zero scale on the "
        "branch's last BatchNorm instead).",
        "",
        f'EKFAC-ra: `ek.ekfac(lr, damping=ε, scaling="running", '
        f'damping_mode="{args.ekfac_damping_mode}", basis_update_every='
        f"{args.basis_update_every}, factor_decay={FACTOR_DECAY})`. KFAC: `ek.kfac(lr, "
        f'damping=ε, damping_mode="factored", basis_update_every={args.basis_update_every}, '
        f'factor_decay={FACTOR_DECAY})`, no update clipping. `damping_mode="factored"` is '
        "the library's Appendix C damping: denominator `s + ε + √ε (T S_A ⊕ S_B)` in the "
        "eigenbasis, for KFAC exactly `((T A + √ε I) ⊗ (B + √ε I))⁻¹`, with no π rebalancing "
        'between the factors; `"tikhonov"` is `s + ε`. '
        f"SGD: `optax.sgd(lr, momentum={SGD_MOMENTUM})` on the plain model; SGD+BN: the same on "
        f"the BatchNorm model (BatchNorm momentum {BN_MOMENTUM}; its losses and accuracies use "
        "the running averages). Every run of an architecture starts from the same parameters "
        "and sees the same minibatches. Losses and accuracies are on the full training / "
        "validation sets at the end of each epoch; seconds are the training steps only, after "
        "compilation. All runs of an architecture are trained in one process, alternating epoch "
        "by epoch (epoch e of every run, then epoch e+1), so that every method sees the same "
        "machine load.",
        "",
        "## Grid",
        "",
        f"- EKFAC-ra, KFAC: learning rate ∈ {fmt_list(args.lrs)} × damping ∈ "
        f"{fmt_list(args.dampings)} ({n_configs} configurations).",
        f"- SGD, SGD+BN: learning rate ∈ {fmt_list(sgd_lrs)} ({len(sgd_lrs)} configurations, "
        "log-spaced over the same range).",
        "- Selection: lowest training loss after the last epoch (a run whose loss becomes NaN or "
        "Inf stops there and counts as +inf).",
    ]
    for arch in args.archs:
        best = best_runs(runs, arch)
        sgd_ms = ms_per_step(runs, arch, "SGD", steps_per_epoch)
        lines += [
            "",
            f"## {arch}: best configuration per method, after {args.epochs} epochs",
            "",
            "| method | best config | train loss | val loss | train acc | val acc | time (s) "
            "| ms/step | step time / SGD's | configs diverged |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method, r in best.items():
            h = r["history"][-1]
            ms = ms_per_step(runs, arch, method, steps_per_epoch)
            grid_runs = [g for g in runs if g["arch"] == arch and g["method"] == method]
            n_diverged = sum(diverged(g["history"]) for g in grid_runs)
            stopped = "" if h[0] == args.epochs else f" (stopped at epoch {h[0]})"
            lines.append(
                f"| {method} | {config_string(r)} | {h[2]:.4f}{stopped} | {h[3]:.4f} | "
                f"{h[4]:.3f} | {h[5]:.3f} | {h[1]:.2f} | {ms:.2f} | {ms / sgd_ms:.2f} | "
                f"{n_diverged}/{len(grid_runs)} |"
            )
        lines += [
            "",
            "ms/step: median over every epoch of the method's runs of the training time per step "
            "(the work of a step does not depend on the learning rate or the damping); time: the "
            "best run's training time; diverged: final training loss NaN, Inf or above the "
            "initial loss.",
            "",
            f"### {arch}: goals and observations",
            "",
            *goal_lines(runs, arch, best),
            edge_line(runs, arch, best),
        ]
    lines += [
        "",
        "Per epoch compares the best runs' training losses at the end of each epoch; per second "
        "compares the wall-clock at which EKFAC-ra first reaches the other method's final "
        "training loss with the other method's own training time (epoch resolution). These are "
        "the measurements of this run only: one seed, a small grid, a machine shared with other "
        "work (see the load average).",
        "",
        "Figure: `convnets.png` (training loss vs epoch and vs time, one row per architecture); "
        "every run's per-epoch losses and accuracies are in `convnets.csv`.",
        "",
    ]
    return "\n".join(lines)


# --- Entry point ----------------------------------------------------------------------------------
def parse_args(argv):
    parser = base_parser(__doc__, quick="CI: tiny models, 256 images, 1 epoch, 1 config")
    parser.add_argument("--cifar-dir", default=None, help="folder with the CIFAR-10 python batches")
    parser.add_argument("--small", action="store_true", help="the small models on CIFAR-10 too")
    parser.add_argument("--digits-size", type=int, default=8, help="digits resized to this (8)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 20; quick 1)")
    parser.add_argument("--lrs", default=None, help="comma list (default 1,0.1,0.01)")
    parser.add_argument("--dampings", default=None, help="comma list (default 0.1,0.01,0.001)")
    parser.add_argument("--basis-update-every", type=int, default=10)
    parser.add_argument("--ekfac-damping-mode", choices=("factored", "tikhonov"),
                        default="factored", help="EKFAC-ra's damping (KFAC: factored)")  # fmt: skip
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma list of VGG, ResNet")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=None, help="use the first N images")
    args = parser.parse_args(argv)
    floats = comma_floats

    if args.quick:
        args.max_train = args.max_train or 256
        args.batch = 64
    args.size = (
        "quick" if args.quick else ("paper" if args.cifar_dir and not args.small else "small")
    )
    args.epochs = args.epochs or (1 if args.quick else 20)
    args.lrs = floats(args.lrs, [1e-2] if args.quick else DEFAULT_LRS)
    args.dampings = floats(args.dampings, [1e-2] if args.quick else DEFAULT_DAMPINGS)
    args.archs = [a.strip() for a in args.archs.split(",")]
    unknown = set(args.archs) - set(ARCHS)
    if unknown:
        parser.error(f"unknown architectures {sorted(unknown)}; choose from {ARCHS}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, writes CSV, PNG and Markdown; returns the paths and the runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_data(args)
    runs, context = run(args, data)
    wall = time.perf_counter() - start

    paths = {k: out / f"convnets.{k}" for k in ("csv", "png", "md")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("arch", "method", "lr", "damping", "epoch", "seconds", "train_loss",
                         "val_loss", "train_acc", "val_acc"))  # fmt: skip
        for r in runs:
            damping = "" if r["damping"] is None else repr(r["damping"])
            for epoch, seconds, *metrics in r["history"]:
                row = (r["arch"], r["method"], repr(r["lr"]), damping, epoch, f"{seconds:.4f}")
                writer.writerow(row + tuple(repr(float(m)) for m in metrics))
    plot(runs, context, args, paths["png"])
    command = " ".join(["python -m benchmarks.convnets", *argv])
    text = summary(runs, context, args, command, wall)
    paths["md"].write_text(text)
    print(text)
    return dict(paths=paths, runs=runs, context=context)


if __name__ == "__main__":
    main()
