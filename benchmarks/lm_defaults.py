"""Out of the box on a language model: KFE-Adam, EKFAC-ra (relative damping) and Adam-grafted
preconditioners against AdamW.

A first measurement for issue 30's goal "KFE-Adam reaches AdamW's best final training loss in
<= 0.6x AdamW's steps", on the decoder of ``benchmarks/modern_lm.py`` (pre-norm, RoPE, QK-norm,
GLU, RMSNorm, no biases, tied embedding; float32 here, so that the losses compare to round-off)
at a vocabulary of 8,192. The data is a synthetic language with a real vocabulary: token
frequencies follow Zipf's law and each token is followed by one of 4 successors drawn for it
(probabilities 0.55, 0.25, 0.15, 0.05), so a model can learn it and its best loss is the
successors' entropy (1.13 nats). Every method runs a small learning-rate grid with its defaults
(KFE-Adam ``b1=0.9``, ``b2=0.999``, ``eps=1e-8``; EKFAC-ra ``damping_mode="relative"``,
``damping=0.1``; basis every 20 steps; the grafted ones ``ek.graft(optax.scale_by_adam(), ...)``
with AdamW's weight decay 1e-4, so that their learning rate is Adam's), the runs of all methods
alternating step by step in one process (so that the machine's noise spreads over all of them);
each run sees the same batches.

Reported per run: the final training loss (mean of the last 10 steps), the first step at which
the running loss (mean of 10 steps) reaches AdamW's best final loss, the wall-clock per step;
per method: its best run, the ratio of steps and wall-clock to AdamW's best run, and the fraction
of its grid within 10% of its best final loss (the paper's Figure 4d sensitivity). A run whose
loss is non-finite or above its first loss at the end counts as diverged.

Usage::

    python -m benchmarks.lm_defaults [--quick] [--out benchmarks/results]
"""

import csv
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ekfac_optax as ek
from benchmarks._common import base_parser, machine_info
from benchmarks.modern_lm import DecoderLM, make_loss, make_step

FULL = dict(vocab=8192, width=64, heads=4, layers=2, seq=32, batch=16, steps=200)
QUICK = dict(vocab=256, width=32, heads=2, layers=1, seq=16, batch=8, steps=12)
LRS = (
    1e-3,
    3e-3,
    1e-2,
    3e-2,
    1e-1,
)  # the learning rates of AdamW and of everything on Adam's scale


def grafted(direction):
    """``lr -> chain(graft(scale_by_adam(), direction), add_decayed_weights, -lr)``: AdamW's
    per-parameter step sizes (and its weight decay) on the direction of one of ours."""

    def make(lr, blocks):
        return optax.chain(
            ek.graft(optax.scale_by_adam(), direction(blocks)),
            optax.add_decayed_weights(1e-4),
            optax.scale_by_learning_rate(lr),
        )

    return make


def relative_ekfac_ra(blocks):
    return ek.scale_by_ekfac(blocks=blocks, scaling="running", damping=0.1, damping_mode="relative")


# name -> (learning-rate grid, (lr, blocks) -> transformation); AdamW first (the target).
METHODS = {
    "AdamW": (LRS, lambda lr, blocks: optax.adamw(lr)),
    "KFE-Adam": (LRS, lambda lr, blocks: ek.kfe_adam(lr, blocks=blocks)),
    "KFE-Adam b2=0.95": (LRS, lambda lr, blocks: ek.kfe_adam(lr, blocks=blocks, b2=0.95)),
    "EKFAC-ra (relative damping 0.1)": (
        (0.003, 0.01, 0.03, 0.1),
        lambda lr, blocks: ek.ekfac(
            lr, blocks=blocks, scaling="running", damping=0.1, damping_mode="relative"
        ),
    ),
    "Adam-grafted EKFAC-ra (relative 0.1)": (LRS, grafted(relative_ekfac_ra)),
    "Adam-grafted EKFAC (batch)": (LRS, grafted(lambda blocks: ek.scale_by_ekfac(blocks=blocks))),
    "Adam-grafted KFAC": (LRS, grafted(lambda blocks: ek.scale_by_kfac(blocks=blocks))),
}
SUCCESSORS = (0.55, 0.25, 0.15, 0.05)
WINDOW = 10  # steps of the running mean


def synthetic_language(vocab: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(start frequencies, successors)``: Zipf start distribution, 4 successors per token."""
    zipf = 1.0 / np.arange(1, vocab + 1)
    successors = np.stack([rng.permutation(vocab)[: len(SUCCESSORS)] for _ in range(vocab)])
    return zipf / zipf.sum(), successors


def batches(size: dict, steps: int, seed: int) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(seed)
    start, successors = synthetic_language(size["vocab"], rng)
    out = []
    for _ in range(steps):
        seq = np.empty((size["batch"], size["seq"] + 1), np.int32)
        seq[:, 0] = rng.choice(size["vocab"], size["batch"], p=start)
        for t in range(size["seq"]):
            pick = rng.choice(len(SUCCESSORS), size["batch"], p=SUCCESSORS)
            seq[:, t + 1] = successors[seq[:, t], pick]
        out.append((jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])))
    return out


def running(losses: list[float]) -> np.ndarray:
    return np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid")


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "vocabulary 256, a smaller model, 12 steps, one lr per method")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    model = DecoderLM(size["vocab"], size["width"], size["heads"], size["layers"], jnp.float32)
    loss_fn = make_loss(model)
    data = batches(size, size["steps"], args.seed)
    params0 = model.init(jax.random.key(args.seed), data[0][0])["params"]
    blocks = ek.find_blocks(loss_fn, params0, *data[0])
    runs = []
    for method, (grid, make_tx) in METHODS.items():
        for lr in grid[2:3] if args.quick else grid:  # quick: one learning rate each
            tx = make_tx(lr, blocks)
            step = make_step(method, loss_fn, tx, donate=False)
            params, state = params0, tx.init(params0)
            params, state, _ = step(params, state, *data[0])  # compile; restarted below
            runs.append(
                dict(
                    method=method,
                    lr=lr,
                    step=step,
                    params=params0,
                    state=tx.init(params0),
                    losses=[],
                    seconds=0.0,
                )
            )
            print(f"  compiled {method} lr {lr}", file=sys.stderr, flush=True)
    for k, batch in enumerate(data):  # the runs alternate step by step
        for run in runs:
            start = time.perf_counter()
            run["params"], run["state"], loss = run["step"](run["params"], run["state"], *batch)
            run["losses"].append(float(loss))  # blocks until the step is done
            run["seconds"] += time.perf_counter() - start
        if (k + 1) % 50 == 0:
            print(f"  step {k + 1}", file=sys.stderr, flush=True)
    for run in runs:
        curve = running(run["losses"])
        run["final"] = float(curve[-1])
        run["diverged"] = not np.isfinite(run["final"]) or run["final"] > run["losses"][0]
        run["ms_per_step"] = 1e3 * run["seconds"] / len(data)
    best = {
        m: min((r for r in runs if r["method"] == m), key=lambda r: r["final"]) for m in METHODS
    }
    target = best["AdamW"]["final"]
    for run in runs:
        reached = np.nonzero(running(run["losses"]) <= target)[0]
        run["steps_to_adamw"] = int(reached[0]) + WINDOW if len(reached) else None
    name = "lm_defaults_quick" if args.quick else "lm_defaults"
    keys = ["method", "lr", "final", "diverged", "steps_to_adamw", "ms_per_step"]
    with open(os.path.join(args.out, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: r[k] for k in keys} for r in runs)
    text = report(runs, best, size, args.quick)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
    return dict(runs=runs, report=text)


def report(runs, best, size, quick) -> str:
    adamw = best["AdamW"]
    lines = [
        "# Out of the box on a language model: KFE-Adam, EKFAC-ra and grafted ones against AdamW",
        "",
        "Written by `python -m benchmarks.lm_defaults" + (" --quick" if quick else "") + "`.",
        f"Machine: {machine_info()}.",
        "",
        f"Decoder of `benchmarks/modern_lm.py` in float32: width {size['width']}, "
        f"{size['layers']} blocks, {size['heads']} heads, vocabulary {size['vocab']}; synthetic "
        f"Zipf language with 4 successors per token (best loss 1.13 nats); batch "
        f"{size['batch']} x {size['seq']}, {size['steps']} steps, the same batches for every "
        f"run, runs alternating step by step. Final loss: mean of the last {WINDOW} steps. "
        f"Steps to AdamW: first step whose {WINDOW}-step running loss reaches AdamW's best final "
        f"loss ({adamw['final']:.4f}, lr {adamw['lr']:g}).",
        "",
        "| method | lr | final loss | steps to AdamW's best | ms/step | diverged |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        steps = "never" if r["steps_to_adamw"] is None else str(r["steps_to_adamw"])
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['final']:.4f} | {steps} | "
            f"{r['ms_per_step']:.1f} | {r['diverged']} |"
        )
    lines += ["", "## Per method (best run)", ""]
    lines += [
        "| method | best lr | final loss | steps vs AdamW | wall-clock vs AdamW | grid within 10% "
        "of best | diverged runs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    adamw_steps = adamw["steps_to_adamw"]
    for method, b in best.items():
        mine = [r for r in runs if r["method"] == method]
        within = sum(r["final"] <= 1.1 * b["final"] for r in mine) / len(mine)
        if b["steps_to_adamw"] is None or adamw_steps is None:
            steps, clock = "never", "-"
        else:
            ratio = b["steps_to_adamw"] / adamw_steps
            clock_ratio = ratio * b["ms_per_step"] / adamw["ms_per_step"]
            steps, clock = f"{ratio:.2f}x", f"{clock_ratio:.2f}x"
        lines.append(
            f"| {method} | {b['lr']:g} | {b['final']:.4f} | {steps} | {clock} | "
            f"{within:.0%} | {sum(r['diverged'] for r in mine)} |"
        )
    lines += ["", "## Goals (issue 30, this model only)", ""]
    for method, b in best.items():
        if method == "AdamW":
            continue
        if b["steps_to_adamw"] is not None and adamw_steps is not None:
            ratio = b["steps_to_adamw"] / adamw_steps
            result = f"{'held' if ratio <= 0.6 else 'NOT met'} ({ratio:.2f}x)"
        else:
            result = "NOT met (never reached)"
        lines.append(f"- {method} reaches AdamW's best final loss in <= 0.6x its steps: {result}")
    diverged = sum(r["diverged"] for r in runs if r["method"] != "AdamW")
    lines.append(
        f"- No non-finite or exploding run of ours: {'held' if not diverged else 'NOT met'}"
        f" ({diverged} diverged)"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
