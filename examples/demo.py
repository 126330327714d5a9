"""EKFAC, EKFAC-ra, KFAC and Adam on a deep sigmoid auto-encoder.

The model has the shape of the deep auto-encoder of Hinton & Salakhutdinov (2006) that George et
al. (2018) train in their experiments (784-1000-500-250-30-250-500-1000-784, sigmoid hidden layers,
a linear code layer, a binary cross-entropy on the pixels), scaled down to the 8x8 digits that
scikit-learn ships (1797 images of 64 pixels, 0..16 scaled to [0, 1]):
64-128-64-32-8-32-64-128-64.

Every method starts from the same parameters and sees the same minibatches. The time per step is
wall-clock time after compilation (the first step of each method is left out) and includes the
periodic eigendecompositions. The loss reported and plotted is the loss on the full data set at the
end of each epoch.

Run with `make demo` (or `.venv/bin/python examples/demo.py --epochs 20 --out outputs/demo.png`).
"""

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits

import ekfac_optax as ek

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Hyperparameters, from a small grid search over 10-40 epochs (learning rate x damping for each
# method, and the update clipping for KFAC). All three Kronecker-factored methods use the same
# damping and refresh their eigenbasis every BASIS_UPDATE_EVERY steps. Without clipping, KFAC
# either diverged (small damping) or stayed on the plateau at the mean image (large damping) in
# that grid; EKFAC and EKFAC-ra did best without it.
DAMPING = 1e-5
BASIS_UPDATE_EVERY = 20
BATCH_SIZE = 100
LEARNING_RATES = {"EKFAC": 3e-3, "EKFAC-ra": 1e-2, "KFAC": 0.3, "Adam": 1e-2}
KFAC_CLIP_NORM = 10.0  # optax.clip_by_global_norm on KFAC's preconditioned update


# --- Data -----------------------------------------------------------------------------------------
def load_data() -> np.ndarray:
    """The 1797 digit images as float32 rows of 64 pixels in [0, 1]."""
    return (load_digits().data / 16.0).astype(np.float32)


def loss_floor(data: np.ndarray) -> float:
    """The loss of a perfect reconstruction: the pixels' binary entropy, summed, batch mean.

    The targets are grey levels, not bits, so the cross-entropy cannot reach zero.
    """
    p = np.clip(data.astype(np.float64), 1e-12, 1 - 1e-12)
    return float(-(data * np.log(p) + (1 - data) * np.log1p(-p)).sum(-1).mean())


# --- Model ----------------------------------------------------------------------------------------
class AutoEncoder(nn.Module):
    """Sigmoid hidden layers, a linear code layer and pixel logits at the output."""

    hidden: tuple[int, ...] = (128, 64, 32)
    code: int = 8
    pixels: int = 64

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.sigmoid(nn.Dense(width)(x))
        x = nn.Dense(self.code)(x)  # linear code layer
        for width in reversed(self.hidden):
            x = nn.sigmoid(nn.Dense(width)(x))
        return nn.Dense(self.pixels)(x)  # logits of the reconstructed pixels


model = AutoEncoder()


# --- Loss -----------------------------------------------------------------------------------------
def loss_fn(params, x):
    """Binary cross-entropy summed over the pixels, MEAN over the batch."""
    logits = model.apply({"params": params}, x)
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()


# --- Optimizers and train steps -------------------------------------------------------------------
def make_ekfac_step(tx):
    """A train step for a preconditioner that needs the layer statistics."""
    grad_fn = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def train_step(params, opt_state, x):
        loss, grads, stats = grad_fn(params, x)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_plain_step(tx):
    """A train step for a first-order optax optimizer."""

    @jax.jit
    def train_step(params, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_methods(blocks):
    """Each method's name, optax transformation and train-step factory.

    ``blocks``: ``ek.find_blocks(loss_fn, params, x)`` for a batch ``x`` of the training shapes.
    """
    lr = LEARNING_RATES
    common = dict(blocks=blocks, damping=DAMPING, basis_update_every=BASIS_UPDATE_EVERY)
    ekfac = ek.ekfac(lr["EKFAC"], scaling="batch", **common)
    ekfac_ra = ek.ekfac(lr["EKFAC-ra"], scaling="running", **common)
    # The preconditioner is an ordinary optax transformation: chain it with others.
    kfac = optax.chain(
        ek.scale_by_kfac(**common),
        optax.clip_by_global_norm(KFAC_CLIP_NORM),
        optax.scale_by_learning_rate(lr["KFAC"]),
    )
    return {
        "EKFAC": (ekfac, make_ekfac_step),
        "EKFAC-ra": (ekfac_ra, make_ekfac_step),
        "KFAC": (kfac, make_ekfac_step),
        "Adam": (optax.adam(lr["Adam"]), make_plain_step),
    }


# --- Train loop -----------------------------------------------------------------------------------
def train(name, tx, make_step, params, data, epochs, seed):
    """Trains one method; returns its per-epoch losses, cumulative seconds and ms per step."""
    train_step = make_step(tx)
    full_loss = jax.jit(loss_fn)
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)  # same minibatches for every method
    n_batches = len(data) // BATCH_SIZE

    losses = [float(full_loss(params, data))]
    seconds = [0.0]
    step_times = []
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for b in range(n_batches):
            x = data[order[b * BATCH_SIZE : (b + 1) * BATCH_SIZE]]
            start = time.perf_counter()
            params, opt_state, loss = train_step(params, opt_state, x)
            jax.block_until_ready((params, opt_state, loss))
            step_times.append(time.perf_counter() - start)
        losses.append(float(full_loss(params, data)))
        # The first step compiles; it counts neither in the clock nor in the mean.
        seconds.append(float(np.sum(step_times[1:])))
        if not np.isfinite(losses[-1]):
            break
    ms_per_step = 1e3 * float(np.mean(step_times[1:]))
    print(f"  {name:<9} final loss {losses[-1]:8.3f}   {ms_per_step:7.2f} ms/step", flush=True)
    return losses, seconds, ms_per_step


# --- Plot -----------------------------------------------------------------------------------------
def plot(results, floor, path):
    """Two panels: full-data training loss against epochs and against seconds."""
    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (losses, seconds, _) in results.items():
        ax_epoch.plot(np.arange(len(losses)), losses, marker=".", label=name)
        ax_time.plot(seconds, losses, marker=".", label=name)
    ax_epoch.set_xlabel("epoch")
    ax_time.set_xlabel("training time after compilation (s)")
    for ax in (ax_epoch, ax_time):
        ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label="perfect reconstruction")
        ax.set_ylabel("training loss (BCE summed over pixels)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Deep sigmoid auto-encoder 64-128-64-32-8-32-64-128-64 on sklearn digits")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="epochs per method")
    parser.add_argument("--out", default="outputs/demo.png", help="where to write the plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_data()
    params = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, data.shape[1])))["params"]
    floor = loss_floor(data)
    print(f"data: {data.shape[0]} images x {data.shape[1]} pixels, minibatch {BATCH_SIZE}")
    print(f"loss of a perfect reconstruction (pixel entropy): {floor:.3f}")
    # The layers to precondition, found by an abstract run of loss_fn on a batch of the training
    # shapes (no FLOPs).
    blocks = ek.find_blocks(loss_fn, params, data[:BATCH_SIZE])
    print(ek.summarize(params, blocks))
    print(f"training {args.epochs} epochs per method ({jax.default_backend()} backend)")

    results = {}
    for name, (tx, make_step) in make_methods(blocks).items():
        results[name] = train(name, tx, make_step, params, data, args.epochs, args.seed)

    print()
    print(f"| {'method':<9} | {'final training loss':>19} | {'ms per step':>11} |")
    print(f"|{'-' * 11}|{'-' * 21}|{'-' * 13}|")
    for name, (losses, _, ms_per_step) in results.items():
        print(f"| {name:<9} | {losses[-1]:>19.3f} | {ms_per_step:>11.2f} |")

    plot(results, floor, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
