"""Out of the box: our preconditioners, their defaults and one learning-rate grid, vs AdamW.

Issue 30's §4 on several models, one per ``--problem``:

- ``lm8192``: the decoder of ``benchmarks/modern_lm.py`` (pre-norm, RoPE, QK-norm, GLU, RMSNorm,
  no biases, tied embedding; float32 here, so that the losses compare to round-off) at a vocabulary
  of 8,192, on a synthetic language with a real vocabulary: token frequencies follow Zipf's law and
  each token is followed by one of 4 successors drawn for it (probabilities 0.55, 0.25, 0.15,
  0.05), so a model can learn it and its best loss is the successors' entropy (1.13 nats);
- ``char_lm``: the repository's transformer LM (``benchmarks/transformer.py``'s ``lm`` task: a
  pre-LN transformer of stock Flax modules, next character of scikit-learn's dataset
  descriptions), minibatches drawn from its training windows;
- ``ae28`` / ``ae8``: the deep auto-encoders of ``benchmarks/autoencoder.py`` (784-1000-500-250-30
  on the 8x8 digits resized to 28x28; 64-128-64-32-8 on the 8x8 digits), binary cross-entropy;
- ``vgg`` / ``resnet``: the small VGG and ResNet of ``benchmarks/convnets.py`` without
  normalisation on the 8x8 digits, softmax cross-entropy.

Every method runs a small learning-rate grid with its defaults (``optax.contrib.muon``: Muon on
the 2-D weights, Adam on the rest; KFE-Adam ``b1=0.9``,
``b2=0.999``, ``eps=1e-8``; EKFAC-ra ``damping_mode="relative"``, ``damping=0.1``; "norm 1e-3":
``norm_constraint=1e-3`` (``ek.clip_by_fisher_norm``: each step's squared norm in the
preconditioner's curvature at most 1e-3, Ba et al.'s KL clipping); basis every 20 steps; the
grafted ones ``ek.graft(optax.scale_by_adam(), ...)`` with AdamW's weight decay
1e-4, so that their learning rate is Adam's ("basis every 10": ``basis_update_every=10``;
"factors every 10": ``factor_update_every=10``, this batch's factors averaged in on every tenth
step only; "embedding E": ``embedding_damping=E``, the relative damping of the embedding's block,
otherwise that of the other blocks, ``ek.grafted_ekfac``'s default 1.0; "embedding lr x3": the
token embedding's updates multiplied by 3, for AdamW as for ours, a diagnostic of what bounds
the LMs, not a default), the runs of all methods alternating step by step in one process (so
that the machine's noise spreads over all of them); each run sees the same batches from the
same initial parameters.

Reported per run: the final training loss (mean of the last 10 steps), the first step at which
the running loss (mean of 10 steps) reaches AdamW's best final loss, the wall-clock per step;
per method: its best run, the ratio of steps and wall-clock to AdamW's best run, and the fraction
of its grid within 10% of its best final loss (the paper's Figure 4d sensitivity). A run whose
loss is non-finite or above its first loss at the end counts as diverged.

Usage::

    python -m benchmarks.defaults [--problem lm8192|char_lm|ae28|ae8|vgg|resnet] [--methods A,B]
        [--steps N] [--quick] [--out benchmarks/results]

writes ``defaults_PROBLEM.csv`` and ``defaults_PROBLEM.md`` (``defaults_PROBLEM_quick.*`` with
``--quick``) to ``--out``.
"""

import csv
import os
import shlex
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import ekfac_optax as ek
from benchmarks import autoencoder, convnets, transformer
from benchmarks._common import Progress, base_parser, machine_info
from benchmarks.modern_lm import DecoderLM, make_loss, make_step

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # AdamW's grid, and that of every method on Adam's scale
WEIGHT_DECAY = 1e-4  # optax.adamw's default, also given to the grafted methods
WINDOW = 10  # steps of the running mean
STEPS_GOAL = 0.6  # issue 30: AdamW's best final loss in <= 0.6x its steps
NORM = 1e-3  # norm_constraint (ek.clip_by_fisher_norm): Ba et al.'s KL-clipping bound
FACTORS_EVERY = 10  # factor_update_every of the amortized grafted EKFAC-ra (issue 32's f10)


def grafted(direction: Callable) -> Callable:
    """``(lr, blocks) -> chain(graft(scale_by_adam(), direction(blocks)), weight decay, -lr)``:
    AdamW's per-parameter step sizes (and its weight decay) on the direction of one of ours."""

    def make(lr, blocks):
        return optax.chain(
            ek.graft(optax.scale_by_adam(), direction(blocks)),
            optax.add_decayed_weights(WEIGHT_DECAY),
            optax.scale_by_learning_rate(lr),
        )

    return make


def relative_ekfac_ra(blocks, **kwargs):
    return ek.scale_by_ekfac(
        blocks=blocks, scaling="running", damping=0.1, damping_mode="relative", **kwargs
    )


EARLIER_SCALING_DECAY = 0.95  # ek.grafted_ekfac's scaling_decay until 2026-12-08 (now 0.99)


def grafted_ekfac(lr, blocks, **kwargs):
    """``ek.grafted_ekfac(lr, blocks=blocks, **kwargs)`` with the scalings' decay of the results
    before 2026-12-08, 0.95, unless ``kwargs`` name one: the methods' names stay what they ran."""
    return ek.grafted_ekfac(lr, blocks=blocks, **{"scaling_decay": EARLIER_SCALING_DECAY, **kwargs})


EMBEDDING_LR = 3.0  # the embedding's learning-rate multiplier of the "embedding lr x3" diagnostics


def embedding_lr(tx: optax.GradientTransformation, factor: float = EMBEDDING_LR):
    """``tx`` with the updates of the top-level ``embed`` module (the token embedding of both
    LMs) multiplied by ``factor``: a per-layer learning rate, the diagnostic of what bounds the
    LMs' progress (not a method of ours; AdamW gets it too)."""
    boost = optax.masked(optax.scale(factor), lambda params: {k: k == "embed" for k in params})
    return optax.chain(tx, boost)


FIRST_ORDER = ("AdamW", "muon", "AdamW (embedding lr x3)")  # no stats
# name -> (learning-rate grid, (lr, blocks) -> transformation); AdamW first (the target).
METHODS = {
    "AdamW": (LRS, lambda lr, blocks: optax.adamw(lr)),
    "muon": (LRS, lambda lr, blocks: optax.contrib.muon(lr)),
    "KFE-Adam": (LRS, lambda lr, blocks: ek.kfe_adam(lr, blocks=blocks)),
    "KFE-Adam b2=0.95": (LRS, lambda lr, blocks: ek.kfe_adam(lr, blocks=blocks, b2=0.95)),
    "EKFAC-ra (relative damping 0.1)": (
        (0.003, 0.01, 0.03, 0.1),
        lambda lr, blocks: ek.ekfac(
            lr, blocks=blocks, scaling="running", damping=0.1, damping_mode="relative"
        ),
    ),
    "EKFAC-ra (relative 0.1, norm 1e-3)": (
        LRS,
        lambda lr, blocks: ek.ekfac(
            lr,
            blocks=blocks,
            scaling="running",
            damping=0.1,
            damping_mode="relative",
            norm_constraint=NORM,
        ),
    ),
    "EKFAC (norm 1e-3)": (
        LRS,
        lambda lr, blocks: ek.ekfac(lr, blocks=blocks, norm_constraint=NORM),
    ),
    "KFAC (norm 1e-3)": (LRS, lambda lr, blocks: ek.kfac(lr, blocks=blocks, norm_constraint=NORM)),
    "Adam-grafted EKFAC-ra (relative 0.1)": (LRS, grafted(relative_ekfac_ra)),
    # ek.grafted_ekfac before the embeddings got their own damping (results before 2026-12-08):
    # grafted(relative_ekfac_ra(basis every 10)), bit for bit (tests/test_graft.py)
    "Adam-grafted EKFAC-ra (relative 0.1; basis every 10)": (
        LRS,
        lambda lr, blocks: grafted_ekfac(lr, blocks, embedding_damping=0.1),
    ),
    "Adam-grafted EKFAC-ra (relative 0.1; factors every 10)": (
        LRS,
        grafted(lambda blocks: relative_ekfac_ra(blocks, factor_update_every=FACTORS_EVERY)),
    ),
    "Adam-grafted EKFAC-ra (relative 0.3; basis every 10)": (
        LRS,
        lambda lr, blocks: grafted_ekfac(lr, blocks, damping=0.3, embedding_damping=0.3),
    ),
    # embedding 1.0: ek.grafted_ekfac with its defaults until 2026-12-08 (scalings' decay 0.95)
    **{
        f"Adam-grafted EKFAC-ra (relative 0.1, embedding {e}; basis every 10)": (
            LRS,
            lambda lr, blocks, e=e: grafted_ekfac(lr, blocks, embedding_damping=e),
        )
        for e in (0.3, 1.0, 3.0)
    },
    # ek.grafted_ekfac with its defaults since 2026-12-08
    "Adam-grafted EKFAC-ra (relative 0.1, embedding 1.0, scalings' decay 0.99; basis every 10)": (
        LRS,
        lambda lr, blocks: grafted_ekfac(lr, blocks, scaling_decay=0.99),
    ),
    "Adam-grafted EKFAC-ra (relative 0.1, embedding 1.0, scalings' decay 0.999; basis every 10)": (
        LRS,
        lambda lr, blocks: grafted_ekfac(lr, blocks, scaling_decay=0.999),
    ),
    "Adam-grafted EKFAC-ra (relative 0.3, embedding 1.0; basis every 10)": (
        LRS,
        lambda lr, blocks: grafted_ekfac(lr, blocks, damping=0.3),
    ),
    "Adam-grafted EKFAC-ra (relative 0.1; basis and factors every 10)": (
        LRS,
        lambda lr, blocks: grafted_ekfac(
            lr, blocks, embedding_damping=0.1, factor_update_every=FACTORS_EVERY
        ),
    ),
    "Adam-grafted EKFAC-ra (relative 0.1, embedding 1.0; basis and factors every 10)": (
        LRS,
        lambda lr, blocks: grafted_ekfac(lr, blocks, factor_update_every=FACTORS_EVERY),
    ),
    "KFE-Adam (factors every 10)": (
        LRS,
        lambda lr, blocks: ek.kfe_adam(lr, blocks=blocks, factor_update_every=FACTORS_EVERY),
    ),
    # KFE-Adam's direction without momentum (Adam's second moment in the eigenbasis, its
    # square root: RMSProp in the KFE) with Adam's norms: better than EKFAC-ra's on long LM runs
    "Adam-grafted KFE-Adam (b1 0; basis every 10)": (
        LRS,
        grafted(lambda blocks: ek.scale_by_kfe_adam(blocks=blocks, b1=0.0, basis_update_every=10)),
    ),
    "AdamW (embedding lr x3)": (LRS, lambda lr, blocks: embedding_lr(optax.adamw(lr))),
    "KFE-Adam (embedding lr x3)": (
        LRS,
        lambda lr, blocks: embedding_lr(ek.kfe_adam(lr, blocks=blocks)),
    ),
    "Adam-grafted EKFAC (batch)": (LRS, grafted(lambda blocks: ek.scale_by_ekfac(blocks=blocks))),
    "Adam-grafted KFAC": (LRS, grafted(lambda blocks: ek.scale_by_kfac(blocks=blocks))),
}


class Problem(NamedTuple):
    """A model to train: its initial ``params``, ``loss_fn(params, *batch)`` (mean over the
    batch) and the ``batches`` every run sees, with a description for the report."""

    params: Any
    loss_fn: Callable
    batches: list
    desc: str
    vocab: int | None = None  # a language model's: its counting baseline is reported


# --- Problems -------------------------------------------------------------------------------------
SUCCESSORS = (0.55, 0.25, 0.15, 0.05)
LM8192 = dict(vocab=8192, width=64, heads=4, layers=2, seq=32, batch=16)
LM8192_QUICK = dict(vocab=256, width=32, heads=2, layers=1, seq=16, batch=8)


def synthetic_language(vocab: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(start frequencies, successors)``: Zipf start distribution, 4 successors per token."""
    zipf = 1.0 / np.arange(1, vocab + 1)
    successors = np.stack([rng.permutation(vocab)[: len(SUCCESSORS)] for _ in range(vocab)])
    return zipf / zipf.sum(), successors


def lm8192(quick: bool, steps: int, seed: int) -> Problem:
    size = LM8192_QUICK if quick else LM8192
    rng = np.random.default_rng(seed)
    start, successors = synthetic_language(size["vocab"], rng)
    batches = []
    for _ in range(steps):
        seq = np.empty((size["batch"], size["seq"] + 1), np.int32)
        seq[:, 0] = rng.choice(size["vocab"], size["batch"], p=start)
        for t in range(size["seq"]):
            pick = rng.choice(len(SUCCESSORS), size["batch"], p=SUCCESSORS)
            seq[:, t + 1] = successors[seq[:, t], pick]
        batches.append((jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])))
    model = DecoderLM(size["vocab"], size["width"], size["heads"], size["layers"], jnp.float32)
    params = model.init(jax.random.key(seed), batches[0][0])["params"]
    desc = (
        f"decoder of `benchmarks/modern_lm.py` in float32: width {size['width']}, "
        f"{size['layers']} blocks, {size['heads']} heads, vocabulary {size['vocab']}; synthetic "
        f"Zipf language with 4 successors per token (best loss 1.13 nats); batch "
        f"{size['batch']} x {size['seq']}"
    )
    return Problem(params, make_loss(model), batches, desc, size["vocab"])


def counting_losses(batches: list, vocab: int) -> np.ndarray:
    """Per batch, the mean loss of an online bigram count on it, before it is counted: token
    ``b`` after ``a`` gets ``(1 - w) u(b) + w c(a, b) / c(a)`` from the pair counts ``c`` of the
    batches before, ``w = c(a) / (c(a) + 1)`` (an unseen ``a`` backs off to the unigram counts
    ``u``, one per token to start with). What the data allows a learner that remembers every
    pair seen: the part of ``lm8192``'s progress that is not optimisation."""
    pairs: dict[int, dict[int, int]] = {}
    unigram, total = np.ones(vocab), vocab
    out = []
    for x, y in batches:
        x, y = np.asarray(x).ravel().tolist(), np.asarray(y).ravel().tolist()
        nll = []
        for a, b in zip(x, y, strict=True):
            seen = pairs.get(a, {})
            n = sum(seen.values())
            w = n / (n + 1.0)
            p = (1 - w) * unigram[b] / total + (w * seen.get(b, 0) / n if n else 0.0)
            nll.append(-np.log(p))
        out.append(float(np.mean(nll)))
        for a, b in zip(x, y, strict=True):
            pairs.setdefault(a, {})[b] = pairs.get(a, {}).get(b, 0) + 1
            unigram[b] += 1
        total += len(y)
    return np.asarray(out)


def minibatches(arrays: tuple, batch: int, steps: int, seed: int) -> list:
    """``steps`` minibatches of ``batch`` rows drawn without replacement within each pass."""
    rng, n, order = np.random.default_rng(seed), len(arrays[0]), np.empty(0, int)
    out = []
    for _ in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        pick, order = order[:batch], order[batch:]
        out.append(tuple(jnp.asarray(a[pick]) for a in arrays))
    return out


def char_lm(quick: bool, steps: int, seed: int) -> Problem:
    task = transformer.lm_task(transformer.SIZES["quick" if quick else "full"], seed)
    loss_with_stats = transformer.make_loss_fn(task)

    def loss_fn(params, x, y):
        return loss_with_stats(params, None, x, y)[0]

    batches = minibatches(task.train, task.batch, steps, seed)
    desc = f"`benchmarks/transformer.py`'s `lm` task: {task.desc}; {task.data_desc}"
    desc += f"; batch {task.batch}"
    return Problem(task.variables["params"], loss_fn, batches, desc)


def auto_encoder(small: bool) -> Callable:
    def build(quick: bool, steps: int, seed: int) -> Problem:
        args = type("Args", (), dict(mnist_dir=None, small=small or quick))
        images, data_desc = autoencoder.load_images(args)
        train, _ = autoencoder.split(images, seed)
        hidden, code = autoencoder.architecture(args, images.shape[1])
        model = autoencoder.AutoEncoder(hidden, code, images.shape[1])
        batch = 32 if quick else 64
        batches = minibatches((train,), batch, steps, seed)
        params = model.init(jax.random.key(seed), batches[0][0])["params"]

        def loss_fn(params, x):
            return autoencoder.bce(model.apply({"params": params}, x), x)

        arch = autoencoder.arch_string(hidden, code, images.shape[1])
        desc = (
            f"auto-encoder {arch} of `benchmarks/autoencoder.py` (sigmoid, linear code, binary "
            f"cross-entropy summed over pixels); {data_desc}, {len(train)} training images; "
            f"batch {batch}"
        )
        return Problem(params, loss_fn, batches, desc)

    return build


def convnet(arch: str) -> Callable:
    def build(quick: bool, steps: int, seed: int) -> Problem:
        args = SimpleNamespace(cifar_dir=None, digits_size=8, seed=seed, max_train=None)
        data = convnets.load_data(args)
        model, bn_model, arch_desc = convnets.make_models(arch, "quick" if quick else "small")
        x0 = jnp.asarray(data.train_x[:1])
        params, _ = convnets.init_variables(model, bn_model, x0, seed)
        batch = 32 if quick else 64
        batches = minibatches((data.train_x, data.train_y), batch, steps, seed)

        def loss_fn(params, x, y):
            return convnets.objective(model.apply({"params": params}, x), (x, y))

        desc = (
            f"{arch} of `benchmarks/convnets.py` without normalisation: {arch_desc}; "
            f"{data.desc}, {len(data.train_x)} training images; batch {batch}"
        )
        return Problem(params, loss_fn, batches, desc)

    return build


PROBLEMS = {
    "lm8192": lm8192,
    "char_lm": char_lm,
    "ae28": auto_encoder(small=False),
    "ae8": auto_encoder(small=True),
    "vgg": convnet("VGG"),
    "resnet": convnet("ResNet"),
}


# --- Runs -----------------------------------------------------------------------------------------
def running(losses: list[float]) -> np.ndarray:
    return np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid")


def split_methods(text: str) -> list[str]:
    """A comma list of method names, some of which hold commas themselves: the pieces are joined
    back while they form the start of a known name."""
    names, pending = [], None
    for piece in text.split(","):
        candidate = piece if pending is None else f"{pending},{piece}"
        if candidate in METHODS or not any(m.startswith(candidate + ",") for m in METHODS):
            names.append(candidate)
            pending = None
        else:
            pending = candidate
    return names if pending is None else [*names, pending]


def parse_args(argv):
    parser = base_parser(__doc__, "a smaller model, 12 steps, one learning rate per method")
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="lm8192")
    parser.add_argument("--methods", default=None, help="comma list (default: all; AdamW always)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (200; quick 12)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 200)
    names = list(METHODS) if args.methods is None else split_methods(args.methods)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    args.methods = ["AdamW"] + [m for m in METHODS if m in names and m != "AdamW"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    problem = PROBLEMS[args.problem](args.quick, args.steps, args.seed)
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.batches[0])
    runs = []
    for method in args.methods:
        grid, make_tx = METHODS[method]
        for lr in grid[2:3] if args.quick else grid:  # quick: one learning rate each
            tx = make_tx(lr, blocks)
            with_stats = method not in FIRST_ORDER
            step = make_step(method, problem.loss_fn, tx, donate=False, with_stats=with_stats)
            step(problem.params, tx.init(problem.params), *problem.batches[0])  # compile
            runs.append(dict(method=method, lr=lr, step=step, losses=[], seconds=0.0))
            runs[-1].update(params=problem.params, state=tx.init(problem.params))
            print(f"  compiled {method} lr {lr}", file=sys.stderr, flush=True)
    progress = Progress(len(problem.batches), every=10)
    for k, batch in enumerate(problem.batches):  # the runs alternate step by step
        for run in runs:
            start = time.perf_counter()
            run["params"], run["state"], loss = run["step"](run["params"], run["state"], *batch)
            run["losses"].append(float(loss))  # blocks until the step is done
            run["seconds"] += time.perf_counter() - start
        progress.advance(f"step {k + 1} of {len(runs)} runs")
    progress.done()
    for run in runs:
        curve = running(run["losses"])
        run["final"] = float(curve[-1])
        run["diverged"] = not np.isfinite(run["final"]) or run["final"] > run["losses"][0]
        run["ms_per_step"] = 1e3 * run["seconds"] / len(problem.batches)
    best = {
        m: min((r for r in runs if r["method"] == m), key=lambda r: r["final"])
        for m in args.methods
    }
    target = best["AdamW"]["final"]
    for run in runs:
        reached = np.nonzero(running(run["losses"]) <= target)[0]
        run["steps_to_adamw"] = int(reached[0]) + WINDOW if len(reached) else None
    name = f"defaults_{args.problem}" + ("_quick" if args.quick else "")
    keys = ["method", "lr", "final", "diverged", "steps_to_adamw", "ms_per_step"]
    with open(os.path.join(args.out, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: r[k] for k in keys} for r in runs)
    counting = None
    if problem.vocab is not None:
        reached = np.nonzero(running(counting_losses(problem.batches, problem.vocab)) <= target)[0]
        counting = int(reached[0]) + WINDOW if len(reached) else None
    command = sys.argv[1:] if argv is None else argv
    text = report(runs, best, problem, args, command, counting)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
    return dict(runs=runs, best=best, report=text)


# --- Report ---------------------------------------------------------------------------------------
def report(runs, best, problem, args, command, counting=None) -> str:
    adamw = best["AdamW"]
    lines = [
        f"# Out of the box on `{args.problem}`: our preconditioners' defaults against AdamW",
        "",
        f"Written by `python -m benchmarks.defaults {shlex.join(command)}`.",
        f"Machine: {machine_info()}.",
        "",
        f"{problem.desc}; {args.steps} steps, the same batches for every run, runs alternating "
        f"step by step. Final loss: mean of the last {WINDOW} steps. Steps to AdamW: first step "
        f"whose {WINDOW}-step running loss reaches AdamW's best final loss "
        f"({adamw['final']:.4f}, lr {adamw['lr']:g}).",
        "",
    ]
    if problem.vocab is not None:
        when = "never" if counting is None else f"at step {counting}"
        lines += [
            f"An online bigram count on the same batches (`counting_losses`: no model, every pair "
            f"seen remembered) reaches AdamW's best final loss {when}: what the data allows; "
            "the rest of the steps are optimisation.",
            "",
        ]
    lines += [
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
    ratios = {}
    for method, b in best.items():
        mine = [r for r in runs if r["method"] == method]
        within = sum(r["final"] <= 1.1 * b["final"] for r in mine) / len(mine)
        if b["steps_to_adamw"] is None or adamw["steps_to_adamw"] is None:
            steps, clock = "never", "-"
        else:
            ratio = b["steps_to_adamw"] / adamw["steps_to_adamw"]
            ratios[method] = (ratio, ratio * b["ms_per_step"] / adamw["ms_per_step"])
            steps, clock = f"{ratios[method][0]:.2f}x", f"{ratios[method][1]:.2f}x"
        lines.append(
            f"| {method} | {b['lr']:g} | {b['final']:.4f} | {steps} | {clock} | "
            f"{within:.0%} | {sum(r['diverged'] for r in mine)} |"
        )
    lines += ["", f"## Goals (issue 30, `{args.problem}` only)", ""]
    for method in best:
        if method == "AdamW":
            continue
        if method in ratios:
            ratio, clock = ratios[method]
            held = "held" if ratio <= STEPS_GOAL else "NOT met"
            result = f"{held} ({ratio:.2f}x the steps, {clock:.2f}x the wall-clock)"
        else:
            result = "NOT met (never reached)"
        lines.append(
            f"- {method} reaches AdamW's best final loss in <= {STEPS_GOAL}x its steps: {result}"
        )
    diverged = [f"{r['method']} lr {r['lr']:g}" for r in runs if r["diverged"]]
    ours = [d for d in diverged if d.split(" lr ")[0] not in FIRST_ORDER]
    lines.append(
        f"- No non-finite or exploding run of ours: {'held' if not ours else 'NOT met'}"
        + (f" ({len(ours)} diverged: {', '.join(ours)})" if ours else "")
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
