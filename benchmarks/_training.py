"""Training runs shared by the benchmarks that compare optimizers over epochs.

Every run of a comparison is trained in one process, alternating: epoch ``e`` of every run, then
epoch ``e + 1`` of every run, and so on, so that a change of the machine's load during the
benchmark affects every method alike rather than whichever ran last. Each run's step function is
compiled (and run twice on a throw-away copy of its state) before any clock starts; a run's clock
counts its training steps only, not the evaluations at the end of each epoch.
"""

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ekfac_optax as ek
from benchmarks._common import Progress


class Runner(NamedTuple):
    """One optimizer on one problem.

    ``init() -> state``; ``step(state, batch) -> (state, loss)`` with ``batch`` a tuple of arrays;
    ``evaluate(state) -> metrics``, a tuple whose first entry is the training loss.
    """

    init: Callable[[], Any]
    step: Callable[[Any, tuple], tuple[Any, Any]]
    evaluate: Callable[[Any], tuple[float, ...]]


def kronecker_loss(model, objective: Callable) -> Callable:
    """``loss_fn(params, batch)``: ``objective`` of ``model``'s output on ``batch[0]``."""
    return lambda params, batch: objective(model.apply({"params": params}, batch[0]), batch)


def find_blocks(model, objective: Callable, params: Any, batch: tuple) -> dict:
    """``ek.find_blocks`` of :func:`kronecker_step`'s loss, on a minibatch of the training shapes
    (an abstract run: no FLOPs); pass it as ``blocks=`` to the transformations of ``make_tx``."""
    return ek.find_blocks(kronecker_loss(model, objective), params, batch)


def kronecker_step(model, objective: Callable, make_tx: Callable) -> Callable:
    """A jitted step of one of ours: ``step(params, opt_state, batch, *hyper)``.

    ``objective(logits, batch)`` is the mean loss of ``model``'s output on ``batch[0]``;
    ``make_tx(*hyper)`` builds the transformation inside the trace, so that the learning rate,
    damping and basis period are traced arguments and one compilation serves a whole grid.
    Returns ``(params, opt_state, loss)``.
    """
    grad_fn = ek.value_grad_and_stats(kronecker_loss(model, objective))

    @jax.jit
    def step(params, opt_state, batch, *hyper):
        loss, grads, stats = grad_fn(params, batch)
        updates, opt_state = make_tx(*hyper).update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def first_order_step(model, objective: Callable, make_tx: Callable, batch_norm: bool) -> Callable:
    """A jitted step of an optax optimizer: ``step(variables, opt_state, batch, lr)``.

    As :func:`kronecker_step`, with ``make_tx(lr)``; with ``batch_norm``, ``variables`` holds
    ``batch_stats`` too, updated by the step (the model runs with ``train=True``). Returns
    ``(variables, opt_state, loss)``.
    """

    def loss_fn(params, batch_stats, batch):
        if not batch_norm:
            return objective(model.apply({"params": params}, batch[0]), batch), None
        variables = {"params": params, "batch_stats": batch_stats}
        logits, new = model.apply(variables, batch[0], train=True, mutable=["batch_stats"])
        return objective(logits, batch), new["batch_stats"]

    @jax.jit
    def step(variables, opt_state, batch, lr):
        params = variables["params"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, variables.get("batch_stats"), batch
        )
        updates, opt_state = make_tx(lr).update(grads, opt_state, params)
        new = {"params": optax.apply_updates(params, updates)}
        if batch_norm:
            new["batch_stats"] = batch_stats
        return new, opt_state, loss

    return step


def pack(out) -> tuple[tuple[Any, Any], Any]:
    """``(params, opt_state, loss)`` from a jitted step as ``Runner.step``'s ``(state, loss)``."""
    params, opt_state, loss = out
    return (params, opt_state), loss


# --- Transformations and compiled steps of a comparison ------------------------------------------
KRONECKER_METHODS = ("EKFAC", "EKFAC-ra", "KFAC")


def kronecker_tx(
    method: str,
    blocks: dict,
    lr,
    damping,
    every,
    *,
    factor_decay: float = 0.95,
    kfac_damping_mode: str = "tikhonov",
    ekfac_damping_mode: str = "tikhonov",
    fallback: str = "diagonal",
    clip: bool = False,
) -> optax.GradientTransformation:
    """One of ``KRONECKER_METHODS`` (EKFAC: ``scaling="batch"``, EKFAC-ra: ``"running"``), then,
    with ``clip``, ``clip_by_global_norm(1.0)``, then the learning rate (``ek.ekfac``'s chain)."""
    common = dict(
        blocks=blocks,
        damping=damping,
        basis_update_every=every,
        factor_decay=factor_decay,
        fallback=fallback,
    )
    if method == "KFAC":
        precondition = ek.scale_by_kfac(damping_mode=kfac_damping_mode, **common)
    elif method in ("EKFAC", "EKFAC-ra"):
        scaling = "running" if method == "EKFAC-ra" else "batch"
        precondition = ek.scale_by_ekfac(scaling=scaling, damping_mode=ekfac_damping_mode, **common)
    else:
        raise ValueError(f"{method!r} is none of {KRONECKER_METHODS}")
    clipping = [optax.clip_by_global_norm(1.0)] if clip else []
    return optax.chain(precondition, *clipping, optax.scale_by_learning_rate(lr))


def traced(value) -> jax.Array:
    """A hyperparameter as a traced argument of a compiled step: int32 for an int (a period),
    else float32."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    return jnp.int32(value) if is_int else jnp.float32(value)


class Compiled:
    """One jitted step per method, built on first use, and the runs that share it.

    The hyperparameters are traced arguments of the step (``step(variables, opt_state, batch,
    *hyper) -> (variables, opt_state, loss)``), so one compilation serves a whole grid. A
    benchmark subclasses it with ``make_tx(method, *hyper)``, ``step(method)``,
    ``initial_variables(method)`` (with ``"params"``, or override ``initial_params``) and
    ``evaluate(method, variables) -> metrics``.
    """

    def __init__(self):
        self.cache = {}

    def cached(self, key, build: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def initial_opt_state(self, method: str, *hyper) -> Any:
        """The method's optimizer state at the start: the same for any hyperparameters, so
        ``hyper`` are placeholders of the right kind."""
        tx = self.make_tx(method, *hyper)
        return self.cached(("init", method), lambda: jax.jit(tx.init)(self.initial_params(method)))

    def initial_params(self, method: str) -> Any:
        return self.initial_variables(method)["params"]

    def runner(self, method: str, *hyper) -> Runner:
        """The run of ``method`` with hyperparameters ``hyper`` (``make_tx``'s after the method)."""
        step, hyper = self.step(method), tuple(traced(h) for h in hyper)
        return Runner(
            init=lambda: (self.initial_variables(method), self.initial_opt_state(method, *hyper)),
            step=lambda s, b: pack(step(s[0], s[1], b, *hyper)),
            evaluate=lambda s: self.evaluate(method, s[0]),
        )


class Problem(NamedTuple):
    """A model trained by Kronecker methods (``model``) and first-order ones (``model``, or
    ``bn_model``: the same with BatchNorm), its data and its blocks."""

    model: Any
    bn_model: Any
    params: Any
    bn_variables: Any  # bn_model's: the same Dense/Conv params, BN scale 1, bias 0, fresh stats
    data: Any
    blocks: dict  # ek.find_blocks of the plain model's loss on a minibatch


class ProblemSteps(Compiled):
    """:class:`Compiled` for a :class:`Problem` with ``objective(logits, batch)``: the Kronecker
    methods' steps are :func:`kronecker_step` (``hyper = (lr, damping, every)``), the others'
    :func:`first_order_step` (``hyper = (lr,)``), with BatchNorm for ``bn_methods``.

    A subclass gives ``kronecker_tx(method, lr, damping, every)``, ``first_order_tx(method, lr)``
    and ``metrics(variables, batch_norm)`` (``variables``: the params, or with ``batch_norm``
    the BatchNorm model's variables).
    """

    kronecker_methods: tuple[str, ...] = KRONECKER_METHODS
    bn_methods: tuple[str, ...] = ()

    def __init__(self, problem: Problem, objective: Callable):
        super().__init__()
        self.problem, self.objective = problem, objective

    def make_tx(self, method: str, *hyper) -> optax.GradientTransformation:
        if method in self.kronecker_methods:
            return self.kronecker_tx(method, *hyper)
        return self.first_order_tx(method, *hyper)

    def step(self, method: str) -> Callable:
        if method in self.kronecker_methods:
            return self.cached(
                method,
                lambda: kronecker_step(
                    self.problem.model, self.objective, lambda *h: self.make_tx(method, *h)
                ),
            )
        bn = method in self.bn_methods
        return self.cached(
            method,
            lambda: first_order_step(
                self.problem.bn_model if bn else self.problem.model,
                self.objective,
                lambda lr: self.make_tx(method, lr),
                batch_norm=bn,
            ),
        )

    def initial_variables(self, method: str) -> Any:
        """The Kronecker methods' params or the first-order methods' variables."""
        if method in self.bn_methods:
            return self.problem.bn_variables
        if method in self.kronecker_methods:
            return self.problem.params
        return {"params": self.problem.params}

    def initial_params(self, method: str) -> Any:
        if method in self.bn_methods:
            return self.problem.bn_variables["params"]
        return self.problem.params

    def evaluate(self, method: str, variables: Any) -> tuple[float, ...]:
        if method not in self.kronecker_methods and method not in self.bn_methods:
            variables = variables["params"]
        return self.metrics(variables, method in self.bn_methods)


def train_alternated(
    runners: Sequence[tuple[str, Runner]],
    data: tuple[np.ndarray, ...],
    epochs: int,
    batch: int,
    seed: int,
) -> list[list[tuple]]:
    """Trains every runner for ``epochs`` epochs on the same minibatches, alternating by epoch.

    Args:
      runners: ``(label, runner)`` pairs; the label is shown in the progress line.
      data: the training arrays (inputs, and labels if any), sliced together into minibatches.
      epochs: epochs per run.
      batch: minibatch size; each epoch is a fresh permutation (from ``seed``) cut into
        ``len(data[0]) // batch`` minibatches, the same for every run.
      seed: seed of the minibatch order.

    Returns:
      One history per runner: ``[(epoch, seconds, *metrics)]`` for epochs ``0..E`` with the
      cumulative training seconds; a run whose training loss becomes NaN or Inf stops there.
    """
    first = tuple(a[:batch] for a in data)
    compiling = Progress(len(runners))
    for label, runner in runners:  # compile everything before any clock starts
        compiling.advance(f"compiling {label}")
        warm = jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a, runner.init())
        for _ in range(2):  # the second step sees a stepped state's dtypes (no weak types)
            warm, loss = runner.step(warm, first)
        jax.block_until_ready((warm, loss))
    compiling.done()
    states = [runner.init() for _, runner in runners]
    histories = [
        [(0, 0.0, *runner.evaluate(state))]
        for (_, runner), state in zip(runners, states, strict=True)
    ]
    rng = np.random.default_rng(seed)
    n_batches = len(data[0]) // batch
    progress = Progress(epochs * len(runners))  # a stopped run's epochs count as done at once
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(data[0]))
        minibatches = [
            tuple(a[order[b * batch : (b + 1) * batch]] for a in data) for b in range(n_batches)
        ]
        for i, (label, runner) in enumerate(runners):
            if states[i] is None:  # stopped on a NaN or Inf
                progress.advance(f"epoch {epoch}/{epochs}, run {i + 1}: stopped")
                continue
            history = histories[i]
            state, seconds = states[i], history[-1][1]
            for minibatch in minibatches:
                start = time.perf_counter()
                state, loss = runner.step(state, minibatch)
                jax.block_until_ready((state, loss))
                seconds += time.perf_counter() - start
            states[i] = state
            history.append((epoch, seconds, *runner.evaluate(state)))
            if not math.isfinite(history[-1][2]):
                states[i] = None  # free its memory
            progress.advance(f"epoch {epoch}/{epochs}, run {i + 1}/{len(runners)}: {label}")
    progress.done()
    return histories


# --- Figures of merit -----------------------------------------------------------------------------
def final_loss(history) -> float:
    """The training loss after the last epoch; inf if it is NaN or Inf."""
    value = history[-1][2]
    return value if math.isfinite(value) else math.inf


def time_to_reach(history, target: float) -> float | None:
    """Seconds at the end of the first epoch whose training loss is <= ``target``."""
    for row in history[1:]:
        if row[2] <= target:
            return row[1]
    return None


def median_ms_per_step(histories, steps_per_epoch: int) -> float:
    """Median over every epoch of the given runs of the training milliseconds per step (the
    work of a step does not depend on the learning rate or the damping, so runs of one method
    pool their epochs)."""
    per_epoch = [
        1e3 * (h[e][1] - h[e - 1][1]) / steps_per_epoch
        for h in histories
        for e in range(1, len(h))
        if math.isfinite(h[e][2])
    ]
    return float(np.median(per_epoch)) if per_epoch else math.nan


def best_by_method(runs: Sequence[dict]) -> dict:
    """The run of each method (``run["method"]``) with the lowest final training loss."""
    best = {}
    for r in runs:
        m = r["method"]
        if m not in best or final_loss(r["history"]) < final_loss(best[m]["history"]):
            best[m] = r
    return best


def config_string(r: dict) -> str:
    s = f"lr={r['lr']:.3g}"
    return s if r["damping"] is None else s + f", damping={r['damping']:g}"


def fmt_list(values) -> str:
    return "{" + ", ".join(f"{v:.3g}" for v in values) + "}"
