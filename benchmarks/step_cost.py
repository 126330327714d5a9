"""Cost of one train step: EKFAC, EKFAC-ra and KFAC against Adam, SGD and kfac-jax.

Times one jitted train step (value and gradient, with the layer statistics for ours, optimizer
update, apply) on MLPs and a small CNN. Every method is compiled and warmed up first (excluded);
then, for each repetition, the methods run in turn (round-robin, so that noise from other
processes on the machine spreads over all of them), each for a window of ``k`` steps ending in
``block_until_ready``. The per-step time is the median over repetitions of ``window / k``.

Amortization: a method that refreshes its eigenbasis every ``p`` steps is timed over windows of
``k = max(p, k_min)`` steps (a multiple of ``p``), so each window holds its eigendecompositions in
proportion. kfac-jax's ``inverse_update_period`` is set to our ``basis_update_every``.

Usage::

    python -m benchmarks.step_cost [--quick] [--out benchmarks/results]
"""

import argparse
import csv
import dataclasses
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import ekfac_optax as ek
from benchmarks._common import cpu_model, import_kfac_jax, kfac_jax_optimizer

DAMPING = 1e-3
LEARNING_RATE = 1e-4  # small, so that thousands of timed steps stay finite
FACTOR_DECAY = 0.95
NEVER = 10**6  # basis_update_every that skips every basis update after the first
QUICK_METHODS = (
    "adam",
    "sgd+momentum",
    "kfac u1",
    "kfac-jax u1",
    "kfac u1e6",
    "ekfac-ra u1",
    "ekfac-ra u1e6",
)


# --- Models and problems -------------------------------------------------------------------------


class MLP(nn.Module):
    """``depth`` hidden Dense layers of ``width`` with ReLU, then a Dense to 10 classes."""

    width: int
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    """Three 3x3 convolutions (32, 64, 64 channels; strides 1, 2, 2), mean pool, Dense to 10."""

    @nn.compact
    def __call__(self, x):
        for features, stride in ((32, 1), (64, 2), (64, 2)):
            x = nn.relu(nn.Conv(features, (3, 3), strides=stride, padding="SAME")(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


@dataclasses.dataclass
class Problem:
    name: str
    model: nn.Module
    x: jax.Array
    y: jax.Array
    params: Any


def make_problem(name: str, model: nn.Module, input_shape: tuple[int, ...]) -> Problem:
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, input_shape, jnp.float32)
    y = jax.random.randint(ky, input_shape[:1], 0, 10)
    params = model.init(kp, x)["params"]
    return Problem(name, model, x, y, params)


def problems(quick: bool) -> list[Problem]:
    if quick:
        return [make_problem("mlp w64 b32", MLP(64), (32, 64))]
    out = [make_problem(f"mlp w{w} b{b}", MLP(w), (b, w)) for w in (256, 1024) for b in (128, 1024)]
    out.append(make_problem("cnn 16x16x3 b128", CNN(), (128, 16, 16, 3)))
    return out


# --- Methods: each builds an initial carry and a function that runs k steps ----------------------


@dataclasses.dataclass
class Runner:
    """A method on a problem: ``carry = run(carry, k)`` runs ``k`` steps and blocks."""

    init: Callable[[], Any]
    run: Callable[[Any, int], Any]
    state_bytes: Callable[[Any], int]


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _loop(step: Callable) -> Callable[[Any, int], Any]:
    def run(carry, k):
        for _ in range(k):
            carry = step(*carry)
        return jax.block_until_ready(carry)

    return run


def optax_runner(problem: Problem, tx: optax.GradientTransformation) -> Runner:
    def loss_fn(params, x, y):
        logits = problem.model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(params, problem.x, problem.y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return Runner(
        init=lambda: (problem.params, tx.init(problem.params)),
        run=_loop(step),
        state_bytes=lambda carry: tree_bytes(carry[1]),
    )


def ours_runner(problem: Problem, tx: optax.GradientTransformationExtraArgs) -> Runner:
    def loss_fn(params, x, y):
        logits = problem.model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad_fn = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def step(params, opt_state):
        _, grads, stats = grad_fn(params, problem.x, problem.y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state

    return Runner(
        init=lambda: (problem.params, tx.init(problem.params)),
        run=_loop(step),
        state_bytes=lambda carry: tree_bytes(carry[1]),
    )


def kfac_jax_status() -> tuple[Any, str]:
    """``(kfac_jax module, "")`` if kfac-jax imports and runs here, else ``(None, reason)``.

    kfac-jax 0.0.8's tracer calls ``subfuns, params = primitive.get_bind_params(params)``; since
    JAX 0.7 ``get_bind_params`` returns the params alone, so every step raises ``ValueError: too
    many values to unpack``. We replace its one-function evaluator ``eval_jaxpr_eqn`` with the
    equivalent of ``jax.core.eval_jaxpr``'s loop body (a compatibility shim with no effect on
    what is computed or on its cost) and check on a tiny problem that a step runs.
    """
    try:
        kfac_jax = import_kfac_jax()
        problem = make_problem("probe", MLP(4, 1), (4, 3))
        runner = kfac_jax_runner(kfac_jax, problem, 2)
        carry = runner.run(runner.init(), 3)
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(carry[0])):
            return None, "a probe step returned non-finite parameters"
        return kfac_jax, ""
    except Exception as e:  # any failure means "unavailable", with its reason
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def kfac_jax_runner(kfac_jax: Any, problem: Problem, period: int) -> Runner:
    """kfac-jax's KFAC with our hyperparameters: fixed learning rate, no momentum, fixed damping.

    ``use_exact_inverses=True`` makes it invert ``A ⊗ B + damping I`` exactly through the
    ``eigh`` of ``A`` and ``B`` (like our ``damping_mode="tikhonov"``), rather than its default
    pi-adjusted factored damping; ``estimation_mode="fisher_empirical"`` uses the true labels,
    like our statistics. Layers are found by kfac-jax's automatic graph scanning; the loss is
    registered with ``register_softmax_cross_entropy_loss``.
    """

    def loss_fn(params, batch):
        x, y = batch
        logits = problem.model.apply({"params": params}, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    optimizer = kfac_jax_optimizer(kfac_jax, loss_fn, LEARNING_RATE, DAMPING, FACTOR_DECAY, period)
    batch = (problem.x, problem.y)
    rng = jax.random.key(1)

    def init():
        # kfac-jax donates its inputs: give it its own copy of the params.
        params = jax.tree.map(jnp.copy, problem.params)
        return params, optimizer.init(params, rng, batch), 0

    def run(carry, k):
        params, state, i = carry
        for _ in range(k):
            params, state, _ = optimizer.step(params, state, rng, batch=batch, global_step_int=i)
            i += 1
        return jax.block_until_ready((params, state)) + (i,)

    return Runner(init=init, run=run, state_bytes=lambda carry: tree_bytes(carry[1]))


def methods(kfac_jax: Any) -> dict[str, tuple[int, Callable[[Problem], Runner]]]:
    """``name -> (basis period, runner factory)``; period 0 for methods without a basis."""
    out = {
        "adam": (0, lambda p: optax_runner(p, optax.adam(LEARNING_RATE))),
        "sgd+momentum": (0, lambda p: optax_runner(p, optax.sgd(LEARNING_RATE, momentum=0.9))),
    }

    def kfac(every):
        return lambda p: ours_runner(
            p,
            ek.kfac(
                LEARNING_RATE,
                damping=DAMPING,
                basis_update_every=every,
                factor_decay=FACTOR_DECAY,
            ),
        )

    def ekfac(every, scaling):
        return lambda p: ours_runner(
            p,
            ek.ekfac(
                LEARNING_RATE,
                damping=DAMPING,
                basis_update_every=every,
                factor_decay=FACTOR_DECAY,
                scaling=scaling,
            ),
        )

    for every in (1, 10, 100):
        out[f"kfac u{every}"] = (every, kfac(every))
        if kfac_jax is not None:
            out[f"kfac-jax u{every}"] = (every, lambda p, e=every: kfac_jax_runner(kfac_jax, p, e))
    out["kfac u1e6"] = (NEVER, kfac(NEVER))
    out["ekfac u10"] = (10, ekfac(10, "batch"))
    for every in (1, 10, 100):
        out[f"ekfac-ra u{every}"] = (every, ekfac(every, "running"))
    out["ekfac-ra u1e6"] = (NEVER, ekfac(NEVER, "running"))
    return out


# --- Measurement ---------------------------------------------------------------------------------


def window_steps(period: int, step_s: float, k_min: int, target_s: float) -> int:
    """Steps per timed window.

    A method with a basis period ``p`` in (10, 100) runs exactly ``p`` steps, so that the window
    holds one basis update (any ``p`` consecutive steps hold exactly one update, whatever the
    phase). The others run ``k_min`` steps, or fewer when one step (``step_s``, measured once
    after compiling) is slow enough that ``target_s`` is reached sooner, but at least one.
    """
    if period not in (0, 1, NEVER):
        return period
    return max(1, min(k_min, math.ceil(target_s / max(step_s, 1e-9))))


def measure(problem, method_table, reps, k_min, target_s, log):
    """``{method: dict(ms per step, compile s, state bytes)}`` for one problem, round-robin."""
    runners, carries, rows = {}, {}, {}
    for name, (period, factory) in method_table.items():
        start = time.perf_counter()
        runner = factory(problem)
        carry = runner.init()
        carry = runner.run(carry, 1)  # compile (+ the first, basis-updating step)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        carry = runner.run(carry, 1)  # one more step, to size the window
        step_s = time.perf_counter() - start
        runners[name], carries[name] = runner, carry
        rows[name] = {
            "period": period,
            "k": window_steps(period, step_s, k_min, target_s),
            "compile_s": compile_s,
            "state_bytes": runner.state_bytes(carry),
            "times": [],
        }
        log(f"  compiled {name:16s} {compile_s:6.1f} s")
    for rep in range(reps):
        for name, runner in runners.items():
            k = rows[name]["k"]
            start = time.perf_counter()
            carries[name] = runner.run(carries[name], k)
            rows[name]["times"].append((time.perf_counter() - start) / k * 1e3)
        log(f"  rep {rep + 1}/{reps} done")
    for name, row in rows.items():
        row["ms"] = statistics.median(row["times"])
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(carries[name][0]))
        row["finite_params"] = finite
    return rows


# --- Report --------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "jaxlib", "optax", "flax", "kfac-jax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def verdict(values: list[float], holds: Callable[[float], bool]) -> str:
    """ "met", "not met" or "met in i of n cases" for the measured ratios."""
    n_met = sum(holds(v) for v in values)
    if not values:
        return "**not measured**"
    if n_met == len(values):
        return "**met** in every case"
    if n_met == 0:
        return "**not met** in any case"
    return f"**met in {n_met} of {len(values)} cases only**"


def write_outputs(
    results, param_bytes, out_dir, command, kfac_jax_reason, reps, k_min, target_s, log
):
    os.makedirs(out_dir, exist_ok=True)
    names = list(next(iter(results.values())).keys())
    csv_path = os.path.join(out_dir, "step_cost.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "problem",
                "method",
                "basis_period",
                "window_steps",
                "ms_per_step",
                "ms_min",
                "ms_max",
                "ratio_to_adam",
                "compile_s",
                "state_bytes",
                "param_bytes",
                "finite_params",
            ]
        )
        for problem, rows in results.items():
            adam = rows["adam"]["ms"]
            for name, row in rows.items():
                writer.writerow(
                    [
                        problem,
                        name,
                        row["period"],
                        row["k"],
                        f"{row['ms']:.4f}",
                        f"{min(row['times']):.4f}",
                        f"{max(row['times']):.4f}",
                        f"{row['ms'] / adam:.3f}",
                        f"{row['compile_s']:.2f}",
                        row["state_bytes"],
                        param_bytes[problem],
                        row["finite_params"],
                    ]
                )

    def ms(rows, name):
        return rows[name]["ms"] if name in rows else None

    lines = ["# Cost of a step", ""]
    lines += [
        "Milliseconds per jitted train step (value and gradient, with layer statistics for ours, "
        "optimizer update, apply), median over "
        f"{reps} round-robin repetitions; each repetition times a window of "
        "exactly N steps for `uN` with N in (10, 100) (basis/inverse update every N steps), "
        "so that the window holds one update and the time is the amortized cost, and otherwise "
        f"{k_min} steps, or fewer (at least 1) when that reaches {target_s} s. "
        "In brackets: ratio to Adam. The machine is shared: numbers are noisy "
        "(per-repetition min and max in the CSV).",
        "",
    ]
    header = "| method | " + " | ".join(results) + " |"
    lines += [header, "|" + " --- |" * (len(results) + 1)]
    for name in names:
        cells = []
        for rows in results.values():
            cells.append(f"{rows[name]['ms']:.3g} ({rows[name]['ms'] / rows['adam']['ms']:.2g}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Ratios", ""]
    ratio_rows = []
    for every in (1, 10, 100):
        ratio_rows.append(
            (f"our KFAC / kfac-jax KFAC, u{every}", f"kfac u{every}", f"kfac-jax u{every}")
        )
    for every in (1, 10, 100):
        ratio_rows.append(
            (f"EKFAC-ra / our KFAC, u{every}", f"ekfac-ra u{every}", f"kfac u{every}")
        )
    ratio_rows.append(("EKFAC (batch) / our KFAC, u10", "ekfac u10", "kfac u10"))
    lines += [
        "| ratio | " + " | ".join(results) + " |",
        "|" + " --- |" * (len(results) + 1),
    ]
    summary = {label: [] for label, _, _ in ratio_rows}
    for label, a, b in ratio_rows:
        values = [ratio(ms(rows, a), ms(rows, b)) for rows in results.values()]
        summary[label] = values
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "## Share of a basis-update step spent in the eigendecomposition", ""]
    lines += [
        "`(t(u1) - t(u1e6)) / t(u1)`: a step that refreshes the basis every time against one "
        "that never does (after step 0). Both run the same code otherwise.",
        "",
        "| method | " + " | ".join(results) + " |",
        "|" + " --- |" * (len(results) + 1),
    ]
    for label, every1, never in (
        ("KFAC", "kfac u1", "kfac u1e6"),
        ("EKFAC-ra", "ekfac-ra u1", "ekfac-ra u1e6"),
    ):
        cells = []
        for rows in results.values():
            t1, t0 = rows[every1]["ms"], rows[never]["ms"]
            cells.append(f"{(t1 - t0) / t1:.0%} ({t1 - t0:.3g} ms)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Optimizer state size (bytes, and as a multiple of the parameters)", ""]
    lines += [
        "| method | " + " | ".join(results) + " |",
        "|" + " --- |" * (len(results) + 1),
        "| parameters | " + " | ".join(f"{param_bytes[p]:,}" for p in results) + " |",
    ]
    for name in names:
        if name.endswith("u1") or name.endswith("u100") or name.endswith("u1e6"):
            continue  # the state does not depend on the period
        cells = [
            f"{rows[name]['state_bytes']:,} ({rows[name]['state_bytes'] / param_bytes[p]:.1f}x)"
            for p, rows in results.items()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Compile time of the first step (s)", ""]
    lines += [
        "| method | " + " | ".join(results) + " |",
        "|" + " --- |" * (len(results) + 1),
    ]
    for name in names:
        cells = [f"{rows[name]['compile_s']:.1f}" for rows in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    # Goals.
    lines += ["", "## Goals", ""]
    if kfac_jax_reason:
        lines.append(
            f"- *Our KFAC step is faster than kfac-jax's at the same amortization*: not measured, "
            f"kfac-jax unavailable: {kfac_jax_reason}"
        )
    else:
        cells, values = [], []
        for every in (1, 10, 100):
            row = summary[f"our KFAC / kfac-jax KFAC, u{every}"]
            values += [v for v in row if not math.isnan(v)]
            cells.append(f"u{every}: " + ", ".join(f"{v:.2f}" for v in row))
        lines.append(
            "- *Our KFAC step is faster than kfac-jax's at the same amortization*: "
            + verdict(values, lambda v: v < 1)
            + " (ours / kfac-jax per problem, in table order: "
            + "; ".join(cells)
            + ")."
        )
    cells, values = [], []
    for every in (1, 10, 100):
        row = summary[f"EKFAC-ra / our KFAC, u{every}"]
        values += [v for v in row if not math.isnan(v)]
        cells.append(f"u{every}: " + ", ".join(f"{v:.2f}" for v in row))
    lines.append(
        "- *EKFAC-ra costs at most 1.3x our KFAC step*: "
        + verdict(values, lambda v: v <= 1.3)
        + " (EKFAC-ra / KFAC per problem: "
        + "; ".join(cells)
        + ")."
    )
    lines += ["", "## Machine and command", ""]
    lines.append(
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible; backend {jax.default_backend()}"
    )
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lines.append(f"- Python {platform.python_version()}")
    lines.append(f"- Command: `{command}`")
    if kfac_jax_reason:
        lines.append(f"- kfac-jax unavailable: {kfac_jax_reason}")
    else:
        lines.append(
            "- kfac-jax: `kfac_jax.Optimizer` with automatic layer registration, "
            "`register_softmax_cross_entropy_loss`, fixed learning rate, momentum 0, fixed "
            f"damping {DAMPING}, `curvature_ema={FACTOR_DECAY}`, `use_exact_inverses=True`, "
            "`estimation_mode='fisher_empirical'`, `num_burnin_steps=0`, "
            "`inverse_update_period` = our `basis_update_every`. kfac-jax 0.0.8 needs a "
            "compatibility shim for JAX >= 0.7 (`get_bind_params` now returns the params alone); "
            "see `kfac_jax_status` in `benchmarks/step_cost.py`."
        )
    lines.append(
        f"- Damping {DAMPING} (tikhonov), factor decay {FACTOR_DECAY}, learning rate "
        f"{LEARNING_RATE} for every method; float32."
    )
    md_path = os.path.join(out_dir, "step_cost.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))

    png_path = os.path.join(out_dir, "step_cost.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plotted = [n for n in names if n != "adam"]
        fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(plotted)), 4.5))
        width = 0.8 / len(results)
        for i, (problem, rows) in enumerate(results.items()):
            values = [rows[n]["ms"] / rows["adam"]["ms"] for n in plotted]
            ax.bar([j + i * width for j in range(len(plotted))], values, width, label=problem)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(plotted))])
        ax.set_xticklabels(plotted, rotation=45, ha="right")
        ax.set_ylabel("time per step / Adam's")
        ax.set_title("Cost of a train step relative to Adam (uN: basis update every N steps)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
    except ImportError as e:
        log(f"no plot: {e}")
        png_path = None
    return csv_path, md_path, png_path


def main(argv: list[str] | None = None) -> dict[str, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny MLP, few repetitions")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 2)")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 3)
    k_min, target_s = (2, 0.01) if args.quick else (10, 0.5)
    command = "python -m benchmarks.step_cost " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    def log(msg):
        print(msg, flush=True)

    kfac_jax, reason = kfac_jax_status()
    if kfac_jax is None:
        log(f"kfac-jax unavailable: {reason}")
    method_table = methods(kfac_jax)
    if args.quick:  # a smoke run: what the ratios need at period 1, and the baselines
        method_table = {n: m for n, m in method_table.items() if n in QUICK_METHODS}
    results, param_bytes = {}, {}
    for problem in problems(args.quick):
        log(f"{problem.name}:")
        param_bytes[problem.name] = tree_bytes(problem.params)
        results[problem.name] = measure(problem, method_table, reps, k_min, target_s, log)
    csv_path, md_path, png_path = write_outputs(
        results, param_bytes, args.out, command.strip(), reason, reps, k_min, target_s, log
    )
    return {"csv": csv_path, "md": md_path, "png": png_path, "kfac_jax": reason or "available"}


if __name__ == "__main__":
    main()
