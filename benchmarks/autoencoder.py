"""Deep auto-encoder: EKFAC vs KFAC, SGD and Adam (George et al. 2018, §4.1, Figures 4 and 5a/b).

The model is the deep auto-encoder of Hinton & Salakhutdinov (2006) that the paper trains:
encoder 784-1000-500-250 (sigmoid) then a linear 30-unit code, a symmetric sigmoid decoder
250-500-1000 and 784 pixel logits; the loss is the binary cross-entropy summed over the pixels,
mean over the batch. Data: MNIST from ``--mnist-dir`` (``train-images-idx3-ubyte``, gzipped or
not); without it, scikit-learn's bundled 8x8 digits (1797 images) resized bilinearly to 28x28
(``jax.image.resize``), so the exact architecture runs without a download. ``--small`` keeps the
8x8 digits and scales the widths down (64-128-64-32-8-32-64-128-64, as ``examples/demo.py``).
20% of the images are held out for validation.

Methods: EKFAC (``ek.ekfac``), EKFAC-ra (``ek.ekfac(scaling="running")``), KFAC (``ek.kfac``,
no update clipping), kfac-jax's KFAC (``kfac_jax.Optimizer`` with exact inverses, fixed learning
rate and damping, no momentum; skipped with the reason printed if it does not import or run), SGD
with momentum 0.9, Adam, and Adam on a variant of the model with ``nn.BatchNorm`` before each
hidden sigmoid. The Kronecker-factored methods search learning rate × damping; the first-order
ones search the learning rate only, over as many values as the Kronecker grid has configurations
(log-spaced over the same range), so every method gets the same number of runs. The best
configuration of each method is the one with the lowest final training loss. Every run starts from
the same parameters and sees the same minibatches.

Time is the wall-clock of the training steps only, after compilation, including the periodic
eigendecompositions; the loss evaluations at the end of each epoch are not counted. All runs of
the grid (then those of Figure 5) train in one process, alternating epoch by epoch
(``benchmarks/_training.py``), so that every method sees the same machine load.

Figure 5 (a/b): EKFAC and KFAC at their best learning rate and damping with the eigenbasis
(and so KFAC's inverse) recomputed every n ∈ {1, 10, 50, 100, 500} steps.

Usage::

    python -m benchmarks.autoencoder [--quick] [--small] [--mnist-dir DIR] [--epochs E]
        [--out benchmarks/results]

writes ``STEM.csv``, ``STEM_fig4.png``, ``STEM_fig5.png`` and ``STEM.md`` to ``--out``, where
``STEM`` is ``autoencoder`` (28x28 or MNIST) or ``autoencoder_small`` (``--small``, ``--quick``).
"""

import csv
import gzip
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import (
    base_parser,
    comma_floats,
    kfac_jax_optimizer,
    kfac_jax_status,
    machine_info,
)
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

PAPER_GRID = (1e-1, 1e-2, 1e-3, 1e-4)
KRONECKER = ("EKFAC", "EKFAC-ra", "KFAC", "kfac-jax")
FIRST_ORDER = ("SGD", "Adam", "Adam+BN")
METHODS = ("EKFAC", "EKFAC-ra", "KFAC", "kfac-jax", "SGD", "Adam", "Adam+BN")
FIG5_METHODS = ("EKFAC", "KFAC")
SGD_MOMENTUM = 0.9
FACTOR_DECAY = 0.95


# --- Data -----------------------------------------------------------------------------------------
def read_idx_images(mnist_dir: str) -> np.ndarray:
    """MNIST ``train-images-idx3-ubyte`` (or ``.gz``) as float32 rows in [0, 1]."""
    for name in ("train-images-idx3-ubyte", "train-images.idx3-ubyte"):
        for suffix in ("", ".gz"):
            path = Path(mnist_dir) / (name + suffix)
            if path.exists():
                raw = (gzip.open if suffix else open)(path, "rb").read()
                magic, n, rows, cols = np.frombuffer(raw[:16], ">i4")
                if magic != 2051:
                    raise ValueError(f"{path}: not an IDX image file (magic {magic})")
                images = np.frombuffer(raw[16:], np.uint8).reshape(n, rows * cols)
                return (images / 255.0).astype(np.float32)
    raise FileNotFoundError(f"no train-images-idx3-ubyte[.gz] in {mnist_dir}")


def load_images(args) -> tuple[np.ndarray, str]:
    """The images as float32 rows in [0, 1] and a description of them."""
    if args.mnist_dir:
        return read_idx_images(args.mnist_dir), f"MNIST training images from {args.mnist_dir}"
    from sklearn.datasets import load_digits

    digits = (load_digits().data / 16.0).astype(np.float32)
    if args.small:
        return digits, "scikit-learn digits, 8x8"
    big = jax.image.resize(digits.reshape(-1, 8, 8), (len(digits), 28, 28), "bilinear")
    big = np.clip(np.asarray(big), 0.0, 1.0).reshape(len(digits), 784)
    return big, "scikit-learn digits resized bilinearly from 8x8 to 28x28"


def split(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = len(images) // 5
    return images[order[n_val:]], images[order[:n_val]]


# --- Model and loss -------------------------------------------------------------------------------
class AutoEncoder(nn.Module):
    """Sigmoid hidden layers, a linear code layer, pixel logits; optional BatchNorm."""

    hidden: tuple[int, ...]
    code: int
    pixels: int
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        def hidden_layer(x, width):
            x = nn.Dense(width)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.sigmoid(x)

        for width in self.hidden:
            x = hidden_layer(x, width)
        x = nn.Dense(self.code)(x)  # linear code layer
        for width in reversed(self.hidden):
            x = hidden_layer(x, width)
        return nn.Dense(self.pixels)(x)  # logits of the reconstructed pixels


def bce(logits, x):
    """Binary cross-entropy summed over the pixels, mean over the batch."""
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()


def objective(logits, batch):
    """The training objective on a minibatch ``(x,)``: reconstruct ``x``."""
    return bce(logits, batch[0])


def architecture(args, pixels: int) -> tuple[tuple[int, ...], int]:
    return ((128, 64, 32), 8) if args.small else ((1000, 500, 250), 30)


def arch_string(hidden, code, pixels) -> str:
    widths = (pixels, *hidden, code, *reversed(hidden), pixels)
    return "-".join(str(w) for w in widths)


# --- Runners --------------------------------------------------------------------------------------
class Steps(ProblemSteps):
    """The compiled steps of the autoencoder (``problem.data``: training and validation images)."""

    kronecker_methods = ("EKFAC", "EKFAC-ra", "KFAC")
    bn_methods = ("Adam+BN",)

    def __init__(self, problem: Problem):
        super().__init__(problem, objective)
        model, bn_model = problem.model, problem.bn_model
        self.loss = jax.jit(lambda params, x: bce(model.apply({"params": params}, x), x))
        self.bn_loss = jax.jit(lambda variables, x: bce(bn_model.apply(variables, x), x))

    def kronecker_tx(self, method: str, lr, damping, every) -> optax.GradientTransformation:
        blocks = self.problem.blocks
        return kronecker_tx(method, blocks, lr, damping, every, factor_decay=FACTOR_DECAY)

    def first_order_tx(self, method: str, lr) -> optax.GradientTransformation:
        return optax.sgd(lr, momentum=SGD_MOMENTUM) if method == "SGD" else optax.adam(lr)

    def metrics(self, variables, batch_norm: bool) -> tuple[float, float]:
        """Training and validation loss, each on the whole set."""
        loss_fn = self.bn_loss if batch_norm else self.loss
        return tuple(float(loss_fn(variables, x)) for x in self.problem.data)


def make_runner(steps: Steps, method: str, lr: float, damping, every: int, kfac_jax) -> Runner:
    if method == "kfac-jax":
        return kfac_jax_runner(kfac_jax, steps, lr, damping, every)
    if method in steps.kronecker_methods:
        return steps.runner(method, float(lr), float(damping), int(every))
    return steps.runner(method, float(lr))


# --- kfac-jax -------------------------------------------------------------------------------------
def kfac_jax_runner(kfac_jax, steps: Steps, lr: float, damping: float, every: int):
    """kfac-jax's KFAC: fixed learning rate and damping, no momentum, exact inverses of
    ``A ⊗ B + damping I`` every ``every`` steps, empirical Fisher, factor EMA 0.95 (as ours)."""
    problem = steps.problem

    def loss_fn(params, x):
        logits = problem.model.apply({"params": params}, x)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
        return bce(logits, x)

    optimizer = kfac_jax_optimizer(kfac_jax, loss_fn, lr, damping, FACTOR_DECAY, every)
    rng = jax.random.key(1)

    def init():
        params = jax.tree.map(jnp.copy, problem.params)  # kfac-jax donates its inputs
        return params, optimizer.init(params, rng, problem.data[0][:1]), 0

    def step(state, batch):
        params, opt_state, i = state
        params, opt_state, stats = optimizer.step(
            params, opt_state, rng, batch=batch[0], global_step_int=i
        )
        return (params, opt_state, i + 1), stats["loss"]

    return Runner(init, step, evaluate=lambda s: steps.metrics(s[0], batch_norm=False))


# --- Runs -----------------------------------------------------------------------------------------
def first_order_lrs(args) -> list[float]:
    """The first-order methods' learning rates: as many as the Kronecker grid has configurations,
    but at least the paper's four (they are cheap), log-spaced over the paper's range; 1e-2 alone
    for ``--quick``."""
    if args.quick:
        return [1e-2]
    n = max(len(args.lrs) * len(args.dampings), len(PAPER_GRID))
    return [float(v) for v in np.logspace(-1, -4, n)]


def run(args, kfac_jax, kfac_jax_reason) -> tuple[list[dict], dict]:
    """Runs the grid and Figure 5; returns ``runs`` (dicts with a ``history``) and context."""
    images, data_desc = load_images(args)
    if args.quick:
        images, data_desc = images[:500], data_desc + " (first 500 images only: --quick)"
    train_x, val_x = split(images, args.seed)
    pixels = images.shape[1]
    hidden, code = architecture(args, pixels)
    model = AutoEncoder(hidden, code, pixels)
    bn_model = AutoEncoder(hidden, code, pixels, batch_norm=True)
    key = jax.random.PRNGKey(args.seed)
    params = model.init(key, jnp.zeros((1, pixels)))["params"]
    bn_variables = bn_model.init(key, jnp.zeros((1, pixels)))
    bn_params = dict(bn_variables["params"])
    bn_params.update({k: v for k, v in params.items()})  # the same Dense weights as the others
    bn_variables = {"params": bn_params, "batch_stats": bn_variables["batch_stats"]}
    blocks = find_blocks(model, objective, params, (train_x[: args.batch],))
    problem = Problem(model, bn_model, params, bn_variables, (train_x, val_x), blocks)
    steps = Steps(problem)

    methods = [m for m in METHODS if m != "kfac-jax" or kfac_jax is not None]
    grid = {
        m: [(lr, d) for lr in args.lrs for d in args.dampings]
        if m in KRONECKER
        else [(lr, None) for lr in first_order_lrs(args)]
        for m in methods
    }
    runs = []

    def train(configs, experiment, epochs):
        """Trains ``(method, lr, damping, every)`` configurations alternately; adds them to runs."""
        labelled = []
        for method, lr, damping, every in configs:
            label = f"{method} lr={lr:g}" + ("" if damping is None else f" damping={damping:g}")
            label += f" n={every}" if experiment == "fig5" else ""
            labelled.append((label, make_runner(steps, method, lr, damping, every, kfac_jax)))
        histories = train_alternated(labelled, (train_x,), epochs, args.batch, args.seed)
        for (method, lr, damping, every), history in zip(configs, histories, strict=True):
            runs.append(dict(method=method, lr=lr, damping=damping, every=every,
                             experiment=experiment, history=history))  # fmt: skip

    every = args.basis_update_every
    train([(m, lr, d, every) for m in methods for lr, d in grid[m]], "grid", args.epochs)
    best = best_runs(runs)
    fig5 = []
    for method in FIG5_METHODS:
        b = best[method]
        for n in args.fig5_periods:
            if n == every and args.fig5_epochs == args.epochs:
                runs.append(dict(b, experiment="fig5"))  # the same run: reuse it
            else:
                fig5.append((method, b["lr"], b["damping"], n))
    if fig5:
        train(fig5, "fig5", args.fig5_epochs)
    context = dict(
        data_desc=data_desc,
        n_train=len(train_x),
        n_val=len(val_x),
        arch=arch_string(hidden, code, pixels),
        grid=grid,
        kfac_jax_reason=kfac_jax_reason,
        mean_image_loss=mean_image_loss(train_x),
        floor=loss_floor(train_x),
    )
    return runs, context


def best_runs(runs) -> dict:
    """The grid run of each method with the lowest final training loss."""
    return best_by_method([r for r in runs if r["experiment"] == "grid"])


def mean_image_loss(x: np.ndarray) -> float:
    """The loss of outputting the mean training image for every input: the plateau."""
    p = np.clip(x.mean(0, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(-1).mean())


def loss_floor(x: np.ndarray) -> float:
    """The loss of a perfect reconstruction (the pixels are grey levels, not bits)."""
    p = np.clip(x.astype(np.float64), 1e-12, 1 - 1e-12)
    return float(-(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(-1).mean())


# --- Figures of merit -----------------------------------------------------------------------------
def on_plateau(history, plateau: float) -> bool:
    return math.isfinite(history[-1][2]) and history[-1][2] >= 0.97 * plateau


def per_epoch_goal(best) -> tuple[bool, bool, int, int]:
    """Whether EKFAC and EKFAC-ra are below KFAC, Adam and SGD at every epoch / the last one."""
    winners = [m for m in ("EKFAC", "EKFAC-ra") if m in best]
    others = [m for m in ("KFAC", "Adam", "SGD") if m in best]

    def losses(m):
        return [h[2] if math.isfinite(h[2]) else math.inf for h in best[m]["history"]]

    n_epochs = min(len(best[m]["history"]) for m in best) - 1
    wins = 0
    for e in range(1, n_epochs + 1):
        wins += all(losses(w)[e] < losses(o)[e] for w in winners for o in others)
    final = all(losses(w)[-1] < losses(o)[-1] for w in winners for o in others)
    return wins == n_epochs, final, wins, n_epochs


# --- Plots ----------------------------------------------------------------------------------------
def plot_fig4(best, context, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(13, 5))
    for method, r in best.items():
        h = np.array([row[:3] for row in r["history"]], dtype=float)
        label = f"{method} ({config_string(r)})"
        ax_epoch.plot(h[:, 0], h[:, 2], marker=".", label=label)
        ax_time.plot(h[1:, 1], h[1:, 2], marker=".", label=label)
    for ax in (ax_epoch, ax_time):
        if "Adam" in best:
            ax.axhline(final_loss(best["Adam"]["history"]), color="k", lw=0.8, ls=":",
                       label="Adam's final loss")  # fmt: skip
        ax.axhline(context["mean_image_loss"], color="grey", lw=0.8, ls="-.",
                   label="plateau (mean image)")  # fmt: skip
        ax.axhline(context["floor"], color="grey", lw=0.8, ls="--",
                   label="perfect reconstruction")  # fmt: skip
        ax.set(yscale="log", ylabel="training loss (BCE summed over pixels)")
        ax.grid(alpha=0.3, which="both")
    ax_epoch.set(xlabel="epoch", title="Fig. 4a: training loss vs epoch (best config per method)")
    ax_time.set(xscale="log", xlabel="wall-clock of the training steps after compilation (s)",
                title="Fig. 4b: training loss vs time")  # fmt: skip
    ax_epoch.legend(fontsize=7)
    fig.suptitle(f"Deep auto-encoder {context['arch']}, {context['data_desc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fig5(runs, context, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    for row, method in enumerate(FIG5_METHODS):
        selected = [r for r in runs if r["experiment"] == "fig5" and r["method"] == method]
        for r in sorted(selected, key=lambda r: r["every"]):
            h = np.array([x[:3] for x in r["history"]], dtype=float)
            axes[row, 0].plot(h[:, 0], h[:, 2], marker=".", label=f"n = {r['every']}")
            axes[row, 1].plot(h[1:, 1], h[1:, 2], marker=".", label=f"n = {r['every']}")
        config = config_string(selected[0]) if selected else ""
        axes[row, 0].set(xlabel="epoch", title=f"{method} ({config}): loss vs epoch")
        axes[row, 1].set(xscale="log", xlabel="wall-clock after compilation (s)",
                         title=f"{method}: loss vs time")  # fmt: skip
        for ax in axes[row]:
            ax.axhline(context["mean_image_loss"], color="grey", lw=0.8, ls="-.",
                       label="plateau (mean image)")  # fmt: skip
            ax.set(yscale="log", ylabel="training loss")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Fig. 5a/b: eigenbasis (KFAC: inverse) recomputed every n steps; {context['arch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Report ---------------------------------------------------------------------------------------
def summary(runs, context, args, command, wall) -> str:
    best = best_runs(runs)
    adam = best.get("Adam")
    target = final_loss(adam["history"]) if adam else math.nan
    adam_time = adam["history"][-1][1] if adam else math.nan
    plateau = context["mean_image_loss"]
    n_configs = len(args.lrs) * len(args.dampings)
    load = os.getloadavg()
    lines = [
        "# Deep auto-encoder (George et al. 2018, §4.1, Figures 4 and 5a/b)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}  ",
        f"Total wall time of the benchmark (compilation and evaluation included): {wall:.0f} s  ",
        f"Load average (1, 5, 15 min) at the end, this benchmark's threads included: "
        f"{', '.join(f'{v:.1f}' for v in load)} on {os.cpu_count()} cores.",
        "",
        f"Setup: {context['arch']} auto-encoder (sigmoid hidden layers, linear code layer, pixel "
        f"logits), binary cross-entropy summed over pixels, mean over the batch. Data: "
        f"{context['data_desc']}; {context['n_train']} training / {context['n_val']} validation "
        f"images. Minibatch {args.batch}, {args.epochs} epochs "
        f"({context['n_train'] // args.batch} steps per epoch), seed {args.seed}. Every run starts "
        f"from the same parameters and sees the same minibatches. Kronecker-factored methods: "
        f"eigenbasis/inverse recomputed every {args.basis_update_every} steps, factor EMA decay "
        f"{FACTOR_DECAY}, Tikhonov damping; KFAC is `ek.kfac` without update clipping. SGD has "
        f"momentum {SGD_MOMENTUM}. Losses are on the full training / validation set at the end "
        "of each epoch; seconds are the training steps only, after compilation. All runs of "
        "the grid (then all runs of Figure 5) are trained in one process, alternating epoch by "
        "epoch (epoch e of every run, then epoch e+1), so that every method sees the same "
        "machine load.",
        "",
        "## Grid",
        "",
        f"- EKFAC, EKFAC-ra, KFAC, kfac-jax: learning rate ∈ {fmt_list(args.lrs)} × damping ∈ "
        f"{fmt_list(args.dampings)} ({n_configs} configurations).",
        f"- SGD, Adam, Adam+BN: learning rate only, ∈ {fmt_list(first_order_lrs(args))} "
        f"({len(first_order_lrs(args))} configurations, log-spaced over the paper's range; at "
        "least as many as the Kronecker-factored methods get).",
        "- Selection: lowest training loss after the last epoch (diverged runs count as +inf).",
    ]
    if args.lrs != list(PAPER_GRID) or args.dampings != list(PAPER_GRID):
        lines.append(
            "- This grid is a subset of the paper's {1e-1, 1e-2, 1e-3, 1e-4} for both "
            "hyperparameters, restricted to fit the time budget."
        )
    if context["kfac_jax_reason"]:
        lines.append(f"- kfac-jax skipped: {context['kfac_jax_reason']}")
    lines += [
        "",
        f"## Best configuration per method, after {args.epochs} epochs",
        "",
        f"Plateau = the loss of outputting the mean training image ({plateau:.2f}); a perfect "
        f"reconstruction scores {context['floor']:.2f}. Time to Adam's final loss "
        f"({target:.3f}): end of the first epoch at or below it (epoch resolution), as a ratio "
        f"to Adam's total time ({adam_time:.2f} s).",
        "",
        "| method | best config | train loss | val loss | time (s) | ms/step | step time / "
        "Adam's | time to Adam's final loss (s) | ratio to Adam | configs diverged | configs on "
        "plateau |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    steps_per_epoch = context["n_train"] // args.batch

    def ms_per_step(method):
        histories = [g["history"] for g in runs if g["experiment"] == "grid"
                     and g["method"] == method]  # fmt: skip
        return median_ms_per_step(histories, steps_per_epoch)

    adam_ms = ms_per_step("Adam")
    for method, r in best.items():
        h = r["history"]
        reach = time_to_reach(h, target) if adam else None
        reach_s = "never within budget" if reach is None else f"{reach:.2f}"
        ratio = "—" if reach is None else f"{reach / adam_time:.2f}"
        grid_runs = [g for g in runs if g["experiment"] == "grid" and g["method"] == method]
        diverged = sum(not math.isfinite(g["history"][-1][2]) for g in grid_runs)
        stuck = sum(on_plateau(g["history"], plateau) for g in grid_runs)
        stopped = "" if len(h) - 1 == args.epochs else f" (stopped at epoch {h[-1][0]})"
        ms = ms_per_step(method)
        lines.append(
            f"| {method} | {config_string(r)} | {h[-1][2]:.3f}{stopped} | {h[-1][3]:.3f} | "
            f"{h[-1][1]:.2f} | {ms:.2f} | {ms / adam_ms:.2f} | {reach_s} | {ratio} | "
            f"{diverged}/{len(grid_runs)} | {stuck}/{len(grid_runs)} |"
        )
    lines += [
        "",
        "ms/step: median over every epoch of the method's grid runs of the training time per "
        "step (the work of a step does not depend on the learning rate or the damping); time: "
        "the best run's training time.",
    ]
    lines += ["", "## Goals", ""]
    if all(m in best for m in ("EKFAC", "EKFAC-ra", "KFAC", "Adam", "SGD")):
        every, final, wins, n = per_epoch_goal(best)
        verdict = (
            "HOLDS" if every else ("holds at the last epoch only" if final else "DOES NOT HOLD")
        )
        lines.append(
            '- "EKFAC and EKFAC-ra reach lower training loss per epoch than KFAC, Adam and SGD": '
            f"**{verdict}** (both below all three at {wins} of {n} epochs; at the last epoch: "
            f"{'yes' if final else 'no'})."
        )
    if "EKFAC-ra" in best and adam:
        reach = time_to_reach(best["EKFAC-ra"]["history"], target)
        ok = reach is not None and reach < 0.5 * adam_time
        detail = "never within its budget" if reach is None else f"ratio {reach / adam_time:.2f}"
        lines.append(
            "- \"EKFAC-ra reaches Adam's final loss in less than half of Adam's wall-clock\": "
            f"**{'HOLDS' if ok else 'DOES NOT HOLD'}** ({detail})."
        )
    stuck = [m for m, r in best.items() if on_plateau(r["history"], plateau)]
    lines.append(
        f"- Plateau (final loss ≥ 97% of the mean-image loss): best runs on it: "
        f"{', '.join(stuck) if stuck else 'none'}; see the per-method counts above."
    )
    lines += [
        "",
        f"## Figure 5: recomputation period n (fixed best lr/damping), {args.fig5_epochs} epochs",
        "",
    ]
    lines.append("| method | config | " + " | ".join(f"n={n}" for n in args.fig5_periods) + " |")
    lines.append("| --- | --- |" + " --- |" * len(args.fig5_periods))
    for method in FIG5_METHODS:
        selected = {r["every"]: r for r in runs if r["experiment"] == "fig5"
                    and r["method"] == method}  # fmt: skip
        if not selected:
            continue
        cells = [
            f"{final_loss(selected[n]['history']):.3f} in {selected[n]['history'][-1][1]:.1f} s"
            for n in args.fig5_periods
        ]
        config = config_string(next(iter(selected.values())))
        lines.append(f"| {method} | {config} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: training loss after the last epoch, and the training time.",
        "",
        f"Figures: `{stem(args)}_fig4.png` (4a, 4b), `{stem(args)}_fig5.png` (5a, 5b); every "
        f"run's per-epoch losses are in `{stem(args)}.csv`.",
        "",
    ]
    return "\n".join(lines)


def stem(args) -> str:
    """The output files' common name: the 8x8 variant's results do not overwrite the 28x28's."""
    return "autoencoder_small" if args.small else "autoencoder"


# --- Entry point ----------------------------------------------------------------------------------
def parse_args(argv):
    parser = base_parser(__doc__, quick="CI: --small, 500 images, 2 epochs, 1 config, n 1/10")
    parser.add_argument("--small", action="store_true", help="8x8 digits, 64-128-64-32-8 widths")
    parser.add_argument("--mnist-dir", default=None, help="folder with train-images-idx3-ubyte")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (30; quick 2)")
    parser.add_argument("--lrs", default=None, help="comma list (default the paper's 4 values)")
    parser.add_argument("--dampings", default=None, help="comma list (default the paper's)")
    parser.add_argument("--basis-update-every", type=int, default=20)
    parser.add_argument("--fig5-periods", default=None, help="comma list (1,10,50,100,500)")
    parser.add_argument("--fig5-epochs", type=int, default=None, help="(default: --epochs)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--no-kfac-jax", action="store_true", help="skip kfac-jax")
    args = parser.parse_args(argv)
    floats = comma_floats

    if args.quick:
        args.small = True
    args.epochs = args.epochs or (2 if args.quick else 30)
    args.fig5_epochs = args.fig5_epochs or args.epochs
    args.lrs = floats(args.lrs, [1e-2] if args.quick else list(PAPER_GRID))
    args.dampings = floats(args.dampings, [1e-3] if args.quick else list(PAPER_GRID))
    periods = floats(args.fig5_periods, [1, 10] if args.quick else [1, 10, 50, 100, 500])
    args.fig5_periods = [int(v) for v in periods]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, writes CSV, PNGs and Markdown; returns the paths and the runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.no_kfac_jax:
        kfac_jax, reason = None, "disabled with --no-kfac-jax"
    else:
        kfac_jax, reason = kfac_jax_status()
    if reason:
        print(f"kfac-jax skipped: {reason}", file=sys.stderr)
    start = time.perf_counter()
    runs, context = run(args, kfac_jax, reason)
    wall = time.perf_counter() - start

    suffixes = {"csv": ".csv", "fig4": "_fig4.png", "fig5": "_fig5.png", "md": ".md"}
    paths = {k: out / f"{stem(args)}{s}" for k, s in suffixes.items()}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("method", "lr", "damping", "epoch", "seconds", "train_loss", "val_loss",
                         "experiment", "basis_update_every"))  # fmt: skip
        for r in runs:
            damping = "" if r["damping"] is None else repr(r["damping"])
            every = r["every"] if r["method"] in KRONECKER else ""
            for epoch, seconds, train_loss, val_loss in r["history"]:
                row = (r["method"], repr(r["lr"]), damping, epoch, f"{seconds:.4f}")
                writer.writerow(row + (repr(train_loss), repr(val_loss), r["experiment"], every))
    best = best_runs(runs)
    plot_fig4(best, context, args, paths["fig4"])
    plot_fig5(runs, context, args, paths["fig5"])
    command = " ".join(["python -m benchmarks.autoencoder", *argv])
    text = summary(runs, context, args, command, wall)
    paths["md"].write_text(text)
    print(text)
    return dict(paths=paths, runs=runs, context=context)


if __name__ == "__main__":
    main()
