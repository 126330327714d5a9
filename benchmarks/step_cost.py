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

import csv
import dataclasses
import importlib.metadata
import math
import os
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
from benchmarks._common import base_parser, kfac_jax_optimizer, kfac_jax_status, machine_info

DAMPING = 1e-3
LEARNING_RATE = 1e-4  # small, so that thousands of timed steps stay finite
FACTOR_DECAY = 0.95
NEVER = 10**6  # basis_update_every that skips every basis update after the first
LARGE_METHODS = (
    "adam",
    "sgd+momentum",
    "kfac u1e6",
    "kfac-jax u1e6",
    "ekfac u1e6",
    "ekfac-ra u1e6",
)
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
    blocks: Any = None  # ek.find_blocks of softmax_loss(problem) on (x, y), set by make_problem


def make_problem(name: str, model: nn.Module, input_shape: tuple[int, ...]) -> Problem:
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, input_shape, jnp.float32)
    y = jax.random.randint(ky, input_shape[:1], 0, 10)
    params = model.init(kp, x)["params"]
    problem = Problem(name, model, x, y, params)
    # An abstract run of the loss (no FLOPs), outside every timed region.
    problem.blocks = ek.find_blocks(softmax_loss(problem), params, x, y)
    return problem


def problems(quick: bool) -> list[Problem]:
    if quick:
        return [make_problem("mlp w64 b32", MLP(64), (32, 64))]
    out = [
        make_problem(f"mlp w{w} b{b}", MLP(w), (b, w))
        for w, b in ((256, 128), (256, 2048), (1024, 128), (1024, 2048))
    ]
    # One 4096-wide hidden layer: a step projects a 4097 x 4096 gradient (~0.55 TFLOP), so only
    # the methods without periodic eigendecompositions are timed there (see `LARGE_METHODS`); the
    # eigendecomposition's cost is measured on its own in the component table.
    out.append(make_problem("mlp w4096 b128 (1 hidden)", MLP(4096, depth=1), (128, 4096)))
    out.append(make_problem("cnn 16x16x3 b128", CNN(), (128, 16, 16, 3)))
    return out


def is_large(problem: Problem) -> bool:
    return tree_bytes(problem.params) > 32 * 2**20


# --- Methods: each builds an initial carry and a function that runs k steps ----------------------


@dataclasses.dataclass
class Runner:
    """A method on a problem: ``carry = run(carry, k)`` runs ``k`` steps and blocks."""

    init: Callable[[], Any]
    run: Callable[[Any, int], Any]
    state_bytes: Callable[[Any], int]
    temp_bytes: Callable[[Any], int | None] = lambda carry: None


def compiled_temp_bytes(step: Callable, carry: Any) -> int | None:
    """XLA's scratch memory for one step (beyond its inputs and outputs), if it reports it."""
    stats = step.lower(*carry).compile().memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _loop(step: Callable) -> Callable[[Any, int], Any]:
    def run(carry, k):
        for _ in range(k):
            carry = step(*carry)
        return jax.block_until_ready(carry)

    return run


def softmax_loss(problem: Problem) -> Callable:
    def loss_fn(params, x, y):
        logits = problem.model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def optax_runner(problem: Problem, tx: optax.GradientTransformation, stats: bool = False) -> Runner:
    """A jitted step of ``tx``; with ``stats``, the gradient comes with the layer statistics from
    ``ek.value_grad_and_stats`` and they are passed to ``tx.update`` (ours)."""
    loss_fn = softmax_loss(problem)
    grad_fn = ek.value_grad_and_stats(loss_fn) if stats else jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, opt_state):
        _, grads, *extra = grad_fn(params, problem.x, problem.y)
        kwargs = {"stats": extra[0]} if stats else {}
        updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
        return optax.apply_updates(params, updates), opt_state

    return Runner(
        init=lambda: (problem.params, tx.init(problem.params)),
        run=_loop(step),
        state_bytes=lambda carry: tree_bytes(carry[1]),
        temp_bytes=lambda carry: compiled_temp_bytes(step, carry),
    )


def probe_kfac_jax(kfac_jax: Any) -> str:
    """Why kfac-jax cannot be timed here ("" if 3 steps on a tiny problem give finite
    parameters; ``import_kfac_jax`` in ``_common.py`` makes it run on this JAX)."""
    problem = make_problem("probe", MLP(4, 1), (4, 3))
    runner = kfac_jax_runner(kfac_jax, problem, 2)
    carry = runner.run(runner.init(), 3)
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(carry[0])):
        return "a probe step returned non-finite parameters"
    return ""


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
        return lambda p: optax_runner(
            p,
            ek.kfac(
                LEARNING_RATE,
                blocks=p.blocks,
                damping=DAMPING,
                basis_update_every=every,
                factor_decay=FACTOR_DECAY,
            ),
            stats=True,
        )

    def ekfac(every, scaling):
        return lambda p: optax_runner(
            p,
            ek.ekfac(
                LEARNING_RATE,
                blocks=p.blocks,
                damping=DAMPING,
                basis_update_every=every,
                factor_decay=FACTOR_DECAY,
                scaling=scaling,
            ),
            stats=True,
        )

    for every in (1, 10, 100):
        out[f"kfac u{every}"] = (every, kfac(every))
        if kfac_jax is not None:
            out[f"kfac-jax u{every}"] = (every, lambda p, e=every: kfac_jax_runner(kfac_jax, p, e))
    out["kfac u1e6"] = (NEVER, kfac(NEVER))
    if kfac_jax is not None:
        out["kfac-jax u1e6"] = (NEVER, lambda p: kfac_jax_runner(kfac_jax, p, NEVER))
    out["ekfac u10"] = (10, ekfac(10, "batch"))
    out["ekfac u1e6"] = (NEVER, ekfac(NEVER, "batch"))
    for every in (1, 10, 100):
        out[f"ekfac-ra u{every}"] = (every, ekfac(every, "running"))
    out["ekfac-ra u1e6"] = (NEVER, ekfac(NEVER, "running"))
    return out


# --- Components of a step and the flop model ----------------------------------------------------

COMPONENTS = (  # the stages of the library's update (ekfac_optax/update/_step.py), and fwd/bwd
    "fwd/bwd",
    "capture",
    "factors",
    "basis",
    "precondition KFAC",
    "precondition EKFAC-ra",
    "precondition EKFAC",
    "guard",
)
EIGH_FLOPS_PER_N3 = 9  # symmetric QR with eigenvectors, ~9 n^3 (Golub & Van Loan, §8.3)


def matmul_gflops(reps: int, n: int = 2048) -> float:
    """The machine's float32 matmul throughput (GFLOP/s), median of ``reps`` timed ``n``-matmuls."""
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    return 2 * n**3 / median_seconds(jax.jit(lambda a: a @ a), (x,), reps) / 1e9


def median_seconds(fn: Callable, args: tuple, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def block_shapes(problem: Problem) -> list[tuple[int, int, int, int]]:
    """``(N, T, a, b)`` per Kronecker block: batch, positions, ``d_in (+1)``, ``d_out``."""
    loss_fn = softmax_loss(problem)
    _, _, stats = jax.eval_shape(
        ek.value_grad_and_stats(loss_fn), problem.params, problem.x, problem.y
    )
    specs = problem.blocks
    return [(*stats[path].h.shape[:2], spec.d_in_aug, spec.d_out) for path, spec in specs.items()]


def component_flops(problem: Problem) -> dict[str, float]:
    """Floating-point operations of each stage of a step, summed over the blocks.

    Per block with batch ``N``, ``T`` positions, ``a = d_in (+1)``, ``b = d_out``: forward and
    backward ``6 N T a b`` (the capture of ``h`` and ``δ`` adds no multiply-adds to dense
    layers; the patches of a conv layer are counted in the forward pass); the factors ``hᵀh``,
    ``δᵀδ``: ``2 N T (a² + b²)``; one eigenbasis: ``9 (a³ + b³)``; the preconditioning, the
    projections ``U_Aᵀ g U_B`` and back: ``4 (a² b + a b²)``, plus EKFAC-ra's running ``s*``
    ``3 a b``, or EKFAC's batch ``s*``: the inputs and output gradients into the KFE,
    ``2 N T (a² + b²)``, then the squared per-example gradients, ``2 N a b`` for ``T = 1`` (else
    the cheaper of ``2 N T a b`` and the position-Gramian path ``2 N T² a b``). The guard reads
    arrays and computes nothing worth counting: its model is 0.
    """
    out = dict.fromkeys(COMPONENTS, 0.0)
    for n, t, a, b in block_shapes(problem):
        projections = 4 * (a * a * b + a * b * b)
        per_example = 2 * n * a * b if t == 1 else 2 * n * t * a * b * min(1, t * (a + b) / (a * b))
        out["fwd/bwd"] += 6 * n * t * a * b
        out["factors"] += 2 * n * t * (a * a + b * b)
        out["basis"] += EIGH_FLOPS_PER_N3 * (a**3 + b**3)
        out["precondition KFAC"] += projections
        out["precondition EKFAC-ra"] += projections + 3 * a * b
        out["precondition EKFAC"] += projections + 2 * n * t * (a * a + b * b) + per_example
    out["capture"] = out["fwd/bwd"]
    return out


def component_seconds(problem: Problem, reps: int) -> dict[str, float]:
    """Measured seconds of each stage of the library's update, each jitted on its own.

    The stages are the library's own functions (``ekfac_optax/update/_step.py``, as
    ``scale_by_ekfac``'s update calls them, at its ``HIGHEST`` matmul precision) on the
    problem's real statistics, gradients and state after one update, so that ``basis``
    decomposes the spectra of real covariances (on CPU much slower than random matrices').
    """
    from ekfac_optax.curvature import _scalings
    from ekfac_optax.kinds import _blocks
    from ekfac_optax.update import _stages, _step, _validation

    loss_fn = softmax_loss(problem)
    grad_stats = jax.jit(ek.value_grad_and_stats(loss_fn))
    _, grads, stats = grad_stats(problem.params, problem.x, problem.y)
    tx = ek.scale_by_ekfac(blocks=problem.blocks, damping=DAMPING, factor_decay=FACTOR_DECAY)
    state = tx.init(problem.params)
    _, state = jax.jit(lambda g, s, st: tx.update(g, s, stats=st))(grads, state, stats)
    specs = _validation.check_update(grads, state, _blocks.with_cap(problem.blocks, None))
    rules = {
        "KFAC": _scalings.KfacScaling(factor_decay=FACTOR_DECAY),
        "EKFAC-ra": _scalings.RunningScaling(scaling_decay=FACTOR_DECAY),
        "EKFAC": _scalings.BatchScaling(scaling_decay=FACTOR_DECAY),
    }
    configs = {
        name: _stages.Config(rule, FACTOR_DECAY, "tikhonov", "expand")
        for name, rule in rules.items()
    }

    def stage(fn):
        """``fn(batch, blocks, *rest)`` jitted over ``(grads, stats, blocks, *rest)``."""

        def run(grads, stats, blocks, *rest):
            with jax.default_matmul_precision("highest"):
                batch = _step.prepare(specs, grads, stats, state.count, DAMPING, DAMPING, False)
                return fn(batch, blocks, *rest)

        return jax.jit(run)

    args = (grads, stats, state.blocks)
    preconditioned = stage(lambda b, blocks: _step.precondition(b, blocks, configs["KFAC"]))(*args)
    eigh_reps = 1 if is_large(problem) else reps
    out = {
        "fwd/bwd": median_seconds(
            jax.jit(jax.grad(loss_fn)), (problem.params, problem.x, problem.y), reps
        ),
        "capture": median_seconds(grad_stats, (problem.params, problem.x, problem.y), reps),
        "factors": median_seconds(
            stage(lambda b, blocks: _step.factors(b, blocks, configs["KFAC"])), args, reps
        ),
        "basis": median_seconds(
            stage(lambda b, blocks: _step.basis(b, blocks, None, configs["EKFAC-ra"])),
            args,
            eigh_reps,
        ),
        "guard": median_seconds(
            stage(
                lambda b, blocks, updates: _step.guard(b, updates, blocks, False, rules["EKFAC-ra"])
            ),
            (*args, preconditioned[0]),
            reps,
        ),
    }
    for name, config in configs.items():
        out[f"precondition {name}"] = median_seconds(
            stage(lambda b, blocks, config=config: _step.precondition(b, blocks, config)),
            args,
            reps,
        )
    return out


def method_components(name: str, period: int) -> dict[str, float]:
    """How many of each stage one step of a method runs (the eigenbasis amortized)."""
    if period == 0:  # Adam, SGD
        return {"fwd/bwd": 1.0}
    rule = (
        "EKFAC-ra"
        if name.startswith("ekfac-ra")
        else "EKFAC"
        if name.startswith("ekfac")
        else "KFAC"
    )
    return {
        "capture": 1.0,
        "factors": 1.0,
        "basis": 0.0 if period == NEVER else 1.0 / period,
        f"precondition {rule}": 1.0,
        "guard": 1.0,
    }


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
            "temp_bytes": runner.temp_bytes(carry),
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


def model_seconds(name: str, period: int, comp_flops: dict[str, float], gflops: float) -> float:
    """The flop model's time for one step of a method, at ``gflops`` GFLOP/s."""
    counts = method_components(name, period)
    return sum(comp_flops[c] * k for c, k in counts.items()) / (gflops * 1e9)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def stages_section(components, problems_, gflops: float, reps: int) -> list[str]:
    """The report's lines on the stages: each timed on its own, next to its flop model."""
    lines = [
        "Each stage of the library's update (`ekfac_optax/update/_step.py`: the functions the "
        "update "
        f"calls) jitted and timed on its own (median of {reps}; the basis once on the 4096-wide "
        "MLP), with the problem's real statistics, gradients and state after one update. "
        "Model: the stage's floating-point operations (see `component_flops`) "
        f"at the machine's measured float32 matmul throughput, **{gflops:.1f} GFLOP/s** "
        "(2048x2048 matmul). Cells: measured ms (model ms; measured / model).",
        "",
    ]
    rows = []
    for c in COMPONENTS:
        cells = []
        for problem in problems_:
            seconds, flops = components[problem]
            model = flops[c] / gflops / 1e6
            cells.append(
                f"{seconds[c] * 1e3:.3g} ({model:.2g}; {seconds[c] * 1e3 / model:.1f}x)"
                if model > 0
                else f"{seconds[c] * 1e3:.3g}"
            )
        rows.append([c, *cells])
    return lines + table(["stage", *problems_], rows)


def write_outputs(
    results,
    param_bytes,
    components,
    gflops,
    out_dir,
    command,
    kfac_jax_reason,
    reps,
    k_min,
    target_s,
    log,
    wall_s,
):
    os.makedirs(out_dir, exist_ok=True)
    problems_ = list(results)
    names = list(dict.fromkeys(n for rows in results.values() for n in rows))

    def ms(problem, name):
        row = results[problem].get(name)
        return row["ms"] if row else None

    def cell(value, fmt="{:.3g}"):
        return "—" if value is None or math.isnan(value) else fmt.format(value)

    csv_path = os.path.join(out_dir, "step_cost.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["problem", "method", "basis_period", "window_steps", "ms_per_step", "ms_min",
             "ms_max", "ratio_to_adam", "model_ms", "measured_over_model", "compile_s",
             "state_bytes", "param_bytes", "step_temp_bytes", "finite_params"]
        )  # fmt: skip
        for problem, rows in results.items():
            for name, row in rows.items():
                model = model_seconds(name, row["period"], components[problem][1], gflops) * 1e3
                writer.writerow(
                    [problem, name, row["period"], row["k"], f"{row['ms']:.4f}",
                     f"{min(row['times']):.4f}", f"{max(row['times']):.4f}",
                     f"{row['ms'] / rows['adam']['ms']:.3f}", f"{model:.4f}",
                     f"{row['ms'] / model:.3f}", f"{row['compile_s']:.2f}", row["state_bytes"],
                     param_bytes[problem], row["temp_bytes"], row["finite_params"]]
                )  # fmt: skip
    comp_csv = os.path.join(out_dir, "step_cost_components.csv")
    with open(comp_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["problem", "component", "measured_ms", "gflop", "model_ms"])
        for problem, (seconds, flops) in components.items():
            for c in COMPONENTS:
                writer.writerow(
                    [problem, c, f"{seconds[c] * 1e3:.4f}", f"{flops[c] / 1e9:.4f}",
                     f"{flops[c] / gflops / 1e6:.4f}"]
                )  # fmt: skip

    lines = ["# Cost of a step", ""]
    lines += [
        "Milliseconds per jitted train step (value and gradient, with layer statistics for ours, "
        f"optimizer update, apply), median over {reps} round-robin repetitions (methods "
        "alternate within each repetition); each repetition times a window of exactly N steps "
        "for `uN` with N in (10, 100) (basis/inverse update every N steps), so that the window "
        "holds one update and the time is the amortized cost, and otherwise "
        f"{k_min} steps, or fewer (at least 1) when that reaches {target_s} s. `u1e6`: the basis "
        "is computed at step 0 only (not timed), i.e. the cost of a step between updates. In "
        "brackets: ratio to Adam. Per-repetition min and max are in `step_cost.csv`. "
        "`mlp wW bB`: two hidden ReLU layers of width W (input W, 10 classes), batch B; the "
        "4096-wide MLP has one hidden layer and runs only the methods without timed "
        "eigendecompositions.",
        "",
    ]
    rows = []
    for name in names:
        cells = []
        for problem in problems_:
            t, adam = ms(problem, name), ms(problem, "adam")
            cells.append("—" if t is None else f"{t:.3g} ({t / adam:.2g}x)")
        rows.append([name, *cells])
    lines += table(["method", *problems_], rows)

    ratio_rows = [
        (f"our KFAC / kfac-jax KFAC, u{e}", f"kfac u{e}", f"kfac-jax u{e}")
        for e in ("1", "10", "100", "1e6")
    ]
    ratio_rows += [
        (f"EKFAC-ra / our KFAC, u{e}", f"ekfac-ra u{e}", f"kfac u{e}")
        for e in ("1", "10", "100", "1e6")
    ]
    ratio_rows += [
        (f"EKFAC (batch) / our KFAC, u{e}", f"ekfac u{e}", f"kfac u{e}") for e in ("10", "1e6")
    ]
    summary = {}
    rows = []
    for label, a, b in ratio_rows:
        values = [ratio(ms(p, a), ms(p, b)) for p in problems_]
        summary[label] = values
        rows.append([label, *(cell(v, "{:.2f}") for v in values)])
    lines += ["", "## Ratios", ""] + table(["ratio", *problems_], rows)

    lines += ["", "## Stages of a step and the flop model", ""]
    lines += stages_section(components, problems_, gflops, reps)
    lines += ["", "## Where the time of a step goes", ""]
    lines += [
        "Share of the measured step time taken by each component (its time on its own × how "
        "often the method runs it: the eigendecomposition once per period); *rest* is what the "
        "components do not account for (preparing the batch's arrays, the fallback, the "
        "write-back, applying the update, dispatch).",
        "",
    ]
    rows = []
    for name in ("kfac u10", "kfac-jax u10", "ekfac u10", "ekfac-ra u10", "ekfac-ra u1e6"):
        counts = method_components(
            name.replace("kfac-jax", "kfac"), int(float(name[name.rindex("u") + 1 :]))
        )
        cells = []
        for problem in problems_:
            t = ms(problem, name)
            if t is None:
                cells.append("—")
                continue
            shares = {c: components[problem][0][c] * 1e3 * k / t for c, k in counts.items()}
            rest = 1 - sum(shares.values())
            cells.append(
                ", ".join(f"{c} {v:.0%}" for c, v in shares.items()) + f", rest {rest:.0%}"
            )
        rows.append([name, *cells])
    lines += table(["method", *problems_], rows)

    lines += ["", "## Measured step time as a multiple of the flop model", ""]
    lines += [
        "The model's time of one step (sum of its components' flops at the measured matmul "
        "throughput, eigendecomposition amortized); cells: model ms, measured / model.",
        "",
    ]
    rows = []
    for name in names:
        cells = []
        for problem in problems_:
            row = results[problem].get(name)
            if row is None:
                cells.append("—")
                continue
            model = model_seconds(name, row["period"], components[problem][1], gflops) * 1e3
            cells.append(f"{model:.3g} ms, {row['ms'] / model:.2f}x")
        rows.append([name, *cells])
    lines += table(["method", *problems_], rows)

    lines += ["", "## Memory: optimizer state and the step's scratch space", ""]
    lines += [
        "State: bytes of the optimizer state (× the parameters' bytes). Scratch: XLA's "
        "temporary buffers of the compiled train step (`memory_analysis().temp_size_in_bytes`; "
        "kfac-jax's step is compiled inside its optimizer, so not reported).",
        "",
    ]
    rows = [["parameters", *(f"{param_bytes[p]:,}" for p in problems_)]]
    for name in names:
        if name.split()[-1] not in ("u10", "u1e6") and name not in ("adam", "sgd+momentum"):
            continue  # the state does not depend on the period
        cells = []
        for problem in problems_:
            row = results[problem].get(name)
            if row is None:
                cells.append("—")
                continue
            temp = row["temp_bytes"]
            cells.append(
                f"state {row['state_bytes']:,} ({row['state_bytes'] / param_bytes[problem]:.1f}x)"
                + ("" if temp is None else f"; scratch {temp:,}")
            )
        rows.append([name, *cells])
    lines += table(["method", *problems_], rows)

    lines += ["", "## Compile time of the first step (s)", ""]
    rows = [
        [name, *(cell(results[p][name]["compile_s"] if name in results[p] else None, "{:.1f}")
                 for p in problems_)]
        for name in names
    ]  # fmt: skip
    lines += table(["method", *problems_], rows)

    lines += ["", "## Goals", ""]
    if kfac_jax_reason:
        lines.append(
            "- *Our KFAC step is faster than kfac-jax's at the same amortization*: not measured, "
            f"kfac-jax unavailable: {kfac_jax_reason}"
        )
    else:
        cells, values = [], []
        for e in ("1", "10", "100", "1e6"):
            row = summary[f"our KFAC / kfac-jax KFAC, u{e}"]
            values += [v for v in row if not math.isnan(v)]
            cells.append(f"u{e}: " + ", ".join(cell(v, "{:.2f}") for v in row))
        lines.append(
            "- *Our KFAC step is faster than kfac-jax's at the same amortization*: "
            + verdict(values, lambda v: v < 1)
            + " (ours / kfac-jax per problem, in table order: "
            + "; ".join(cells)
            + ")."
        )
    cells, values = [], []
    for e in ("1", "10", "100", "1e6"):
        row = summary[f"EKFAC-ra / our KFAC, u{e}"]
        values += [v for v in row if not math.isnan(v)]
        cells.append(f"u{e}: " + ", ".join(cell(v, "{:.2f}") for v in row))
    lines.append(
        "- *EKFAC-ra costs at most 1.3x our KFAC step*: "
        + verdict(values, lambda v: v <= 1.3)
        + " (EKFAC-ra / KFAC per problem: "
        + "; ".join(cells)
        + ")."
    )
    lines += ["", "## Machine and command", ""]
    lines.append(
        f"- Machine: {machine_info()}; load average (1, 5, 15 min) at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lines.append(f"- Command: `{command}`; wall time {wall_s:.0f} s (compilation included)")
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
            "see `import_kfac_jax` in `benchmarks/_common.py`."
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [n for n in names if n != "adam"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(plotted)), 4.5))
    width = 0.8 / len(results)
    for i, (problem, rows_) in enumerate(results.items()):
        xs = [j + i * width for j, n in enumerate(plotted) if n in rows_]
        values = [rows_[n]["ms"] / rows_["adam"]["ms"] for n in plotted if n in rows_]
        ax.bar(xs, values, width, label=problem)
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
    return csv_path, md_path, png_path


def stages_only(args, reps: int, command: str, log) -> str:
    """``--stages``: the stages of every problem, timed on their own, in
    ``step_cost_stages.md``; returns its path."""
    gflops = matmul_gflops(max(reps, 3))
    components = {}
    for problem in problems(args.quick):
        components[problem.name] = (component_seconds(problem, reps), component_flops(problem))
        log(
            f"{problem.name}: "
            + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in components[problem.name][0].items())
        )
    lines = ["# Stages of a step and the flop model", ""]
    lines += [f"Machine: {machine_info()}. Command: `{command}`.", ""]
    lines += stages_section(components, list(components), gflops, reps)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "step_cost_stages.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict[str, str | None]:
    parser = base_parser(__doc__, quick="one tiny MLP, few repetitions", seed=False)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 2)")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="time only the stages of the update (step_cost_stages.md), not the methods",
    )
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 3)
    k_min, target_s = (2, 0.01) if args.quick else (10, 0.5)
    command = "python -m benchmarks.step_cost " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    def log(msg):
        print(msg, flush=True)

    start = time.perf_counter()
    if args.stages:
        return {"md": stages_only(args, reps, command.strip(), log)}
    kfac_jax, reason = kfac_jax_status(probe_kfac_jax)
    if kfac_jax is None:
        log(f"kfac-jax unavailable: {reason}")
    method_table = methods(kfac_jax)
    if args.quick:  # a smoke run: what the ratios need at period 1, and the baselines
        method_table = {n: m for n, m in method_table.items() if n in QUICK_METHODS}
    gflops = matmul_gflops(max(reps, 3))
    log(f"float32 matmul throughput: {gflops:.1f} GFLOP/s")
    results, param_bytes, components = {}, {}, {}
    for problem in problems(args.quick):
        log(f"{problem.name}:")
        param_bytes[problem.name] = tree_bytes(problem.params)
        table = method_table
        if is_large(problem):
            table = {n: m for n, m in method_table.items() if n in LARGE_METHODS}
        results[problem.name] = measure(problem, table, reps, k_min, target_s, log)
        components[problem.name] = (component_seconds(problem, reps), component_flops(problem))
        log(
            "  components: "
            + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in components[problem.name][0].items())
        )
    csv_path, md_path, png_path = write_outputs(
        results,
        param_bytes,
        components,
        gflops,
        args.out,
        command.strip(),
        reason,
        reps,
        k_min,
        target_s,
        log,
        time.perf_counter() - start,
    )
    return {"csv": csv_path, "md": md_path, "png": png_path, "kfac_jax": reason or "available"}


if __name__ == "__main__":
    main()
