"""What the non-finite guard costs a step (issue 32): the library's step with and without it.

The guard's contract: a step whose results are not finite changes nothing but the state's
``skipped``. It has two parts, both in ``ekfac_optax/update/_step.py``: :func:`guard` (is
everything that can become non-finite finite?) and :func:`select` (the new state and updates, or
the old state and zeros). Timed here as whole jitted train steps (capture, update, apply), side by
side in one process, in turn (round-robin), each compiled and warmed up first:

- **guarded**: the library's step as it is;
- **unguarded**: the same step with ``_step.guard`` returning ``True`` and ``_step.select``
  returning the new state, patched while it is traced (the lower bound: no guard at all);
- **before**: the guard of the previous release, for comparison: ``all(isfinite(x))`` per array
  and one ``lax.cond`` choosing between the new and the old state.

Models: the MLPs of ``benchmarks/step_cost.py`` (ReLU, 10 classes, float32), 1024 wide (two
hidden layers) at batch 128 and 2048, 4096 wide (one hidden layer) at batch 128. Methods: EKFAC-ra
and KFAC (tikhonov damping 1e-3), the basis decomposed on the first step only (``basis_update_
every`` beyond the run): without the amortized ``eigh`` in it the step is shortest and the guard's
share largest. Share: ``guarded / unguarded - 1`` of the fastest window of each (timing noise only
adds time); beside it the median over rounds of the same ratio of windows timed next to each other,
and their range (the noise).

Goal (issue 32): the guard at most 1% of a step on the 1024- and 4096-wide MLPs.

Usage::

    python -m benchmarks.guard_cost [--quick] [--out benchmarks/results]
"""

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import optax

import ekfac_optax as ek
from benchmarks import step_cost
from benchmarks._common import base_parser, machine_info, write_results
from ekfac_optax.update import _step

LEARNING_RATE = 1e-4  # small: the timed steps stay finite; quality is not measured here
DAMPING = 1e-3
NEVER = 10**9  # basis on the first update only
GOAL = 0.01
VARIANTS = ("guarded", "unguarded", "before")
FULL = dict(
    problems=(
        ("mlp w1024 b128", 1024, 2, 128),
        ("mlp w1024 b2048", 1024, 2, 2048),
        ("mlp w4096 b128", 4096, 1, 128),
    ),
    methods=("EKFAC-ra", "KFAC"),
    rounds=15,
    target_s=1.0,  # seconds per timed window
)
QUICK = dict(problems=(("mlp w64 b32", 64, 2, 32),), methods=("EKFAC-ra",), rounds=2, target_s=0.0)


def _before_all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _before_select(finite, applied, rejected):
    return jax.lax.cond(finite, lambda: applied, lambda: rejected)


@contextmanager
def variant(name: str):
    """The library's stages as ``name`` has them, while a step is traced."""
    saved = _step.guard, _step.select, _step.all_finite
    if name == "unguarded":
        _step.guard = lambda *args, **kwargs: jnp.asarray(True)
        _step.select = lambda finite, applied, rejected: applied
    elif name == "before":
        _step.all_finite, _step.select = _before_all_finite, _before_select
    try:
        yield
    finally:
        _step.guard, _step.select, _step.all_finite = saved


def make_tx(method: str, blocks) -> optax.GradientTransformation:
    if method == "KFAC":
        return ek.kfac(LEARNING_RATE, blocks=blocks, damping=DAMPING, basis_update_every=NEVER)
    return ek.ekfac(
        LEARNING_RATE, blocks=blocks, damping=DAMPING, basis_update_every=NEVER, scaling="running"
    )


def compiled_step(problem, method: str, name: str) -> tuple[Callable, tuple]:
    """``(step, carry)``: the jitted train step compiled under ``name``, and its first carry
    (after one warm-up step: the basis is decomposed there)."""
    loss_fn = step_cost.softmax_loss(problem)
    grad_fn = ek.value_grad_and_stats(loss_fn)
    tx = make_tx(method, problem.blocks)

    def step(params, opt_state):
        _, grads, stats = grad_fn(params, problem.x, problem.y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state

    carry = (jax.tree.map(jnp.copy, problem.params), tx.init(problem.params))
    with variant(name):
        compiled = jax.jit(step).lower(*carry).compile()
    return compiled, jax.block_until_ready(compiled(*carry))


def measure(problem, method: str, size: dict, log) -> dict:
    runs = {name: list(compiled_step(problem, method, name)) for name in VARIANTS}
    start = time.perf_counter()
    jax.block_until_ready(runs["guarded"][0](*runs["guarded"][1]))
    steps = max(1, round(size["target_s"] / (time.perf_counter() - start)))
    seconds = {name: [] for name in VARIANTS}
    for _ in range(size["rounds"]):
        for name, run in runs.items():
            carry = run[1]
            start = time.perf_counter()
            for _ in range(steps):
                carry = run[0](*carry)
            jax.block_until_ready(carry)
            seconds[name].append((time.perf_counter() - start) / steps)
            run[1] = carry
        skipped = int(optax.tree_utils.tree_get(runs["guarded"][1][1], "skipped"))
        assert skipped == 0, f"{problem.name} {method}: {skipped} steps rejected"
    share = [g / u - 1 for g, u in zip(seconds["guarded"], seconds["unguarded"], strict=True)]
    before = [b / u - 1 for b, u in zip(seconds["before"], seconds["unguarded"], strict=True)]
    row = dict(
        problem=problem.name,
        method=method,
        steps_per_window=steps,
        **{f"{name}_ms": 1e3 * min(seconds[name]) for name in VARIANTS},
        share=min(seconds["guarded"]) / min(seconds["unguarded"]) - 1,
        share_median=statistics.median(share),
        share_min=min(share),
        share_max=max(share),
        before_share=min(seconds["before"]) / min(seconds["unguarded"]) - 1,
        before_share_median=statistics.median(before),
    )
    log(
        f"  {problem.name} {method}: guard {100 * row['share']:+.1f}% "
        f"(before {100 * row['before_share']:+.1f}%)"
    )
    return row


def report(rows: list[dict], size: dict, command: str) -> str:
    lines = [
        "# What the non-finite guard costs a step (issue 32)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}",
        "",
        "Whole jitted train steps side by side in one process, in turn, "
        f"{size['rounds']} rounds of windows of about {size['target_s']:g} s each; basis on the "
        "first step only. *guarded*: the library's step; *unguarded*: the same with the guard "
        "patched out; *before*: the previous release's guard (`all(isfinite)` per array, a "
        "`lax.cond` choosing the state). ms: the fastest window's step. Share: "
        "`guarded / unguarded - 1` of the fastest windows; per round: the median (lowest to "
        "highest) of the same ratio of the windows timed next to each other, the timing noise.",
        "",
        "| problem | method | guarded ms | unguarded ms | before ms | guard share | per round "
        "| before's share | per round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['guarded_ms']:.2f} | {r['unguarded_ms']:.2f} "
            f"| {r['before_ms']:.2f} | {100 * r['share']:+.1f}% | {100 * r['share_median']:+.1f}% "
            f"({100 * r['share_min']:+.1f} to {100 * r['share_max']:+.1f}) "
            f"| {100 * r['before_share']:+.1f}% | {100 * r['before_share_median']:+.1f}% |"
        )
    lines += ["", "## Goal", ""]
    for r in rows:
        held = "held" if r["share"] <= GOAL else "NOT met"
        lines.append(
            f"- {r['problem']}, {r['method']}: the guard {100 * r['share']:+.1f}% of a step "
            f"(goal <= {100 * GOAL:.0f}%): {held}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = base_parser(__doc__, "a tiny MLP, two rounds (smoke test)", seed=False)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for name, width, depth, batch in size["problems"]:
        problem = step_cost.make_problem(name, step_cost.MLP(width, depth), (batch, width))
        for method in size["methods"]:
            rows.append(measure(problem, method, size, log))
    command = "python -m benchmarks.guard_cost" + (" --quick" if args.quick else "")
    name = "guard_cost" + ("_quick" if args.quick else "")
    return write_results(args.out, name, report(rows, size, command), rows)


if __name__ == "__main__":
    main()
