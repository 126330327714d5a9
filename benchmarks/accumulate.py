"""What a micro-step of gradient accumulation costs (issue 32): ``ek.multi_steps`` against
``optax.MultiSteps`` and a plain forward/backward.

The decoder of ``benchmarks/modern_lm.py`` (2 blocks written as a loop, width 128, 4 heads,
vocabulary 512), float32, micro-batches of 16 sequences of 32 tokens (``N T = 512``), 4
micro-batches per real step. Timed side by side in one process (each jitted train step compiled
and warmed up first; the steps in turn, round-robin; the median over repetitions of a window of
20 calls):

- **fwd/bwd**: ``jax.value_and_grad`` of the loss alone; **capture**: the same with the layer
  statistics (``ek.value_grad_and_stats``): what every micro-step of ours must do;
- **micro, ek.multi_steps**: a call that only accumulates (``every_k`` too large to emit): the
  capture plus each micro-batch's factors (and EKFAC's ``s*``) added to the sums;
- **micro, optax.MultiSteps**: the same call through ``optax.MultiSteps``, which runs the whole
  inner update on every call and keeps its result only on the last;
- **real step**: one call that emits (``every_k=1``): the capture plus a preconditioner step;
- **EKFAC-ra, factors every 10**: a micro-step of a real step that reads no factors
  (``factor_update_every=10``, nine real steps in ten): the capture alone.

Per method (AdamW, EKFAC, EKFAC-ra), a real step of ``k`` micro-batches costs ``(k - 1)`` micro
calls and one emitting call; the report prints each against fwd/bwd and the totals.

Usage::

    python -m benchmarks.accumulate [--quick] [--out benchmarks/results]
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ekfac_optax as ek
from benchmarks import modern_lm
from benchmarks._common import base_parser, machine_info, write_results

LEARNING_RATE = 1e-4  # small: the timed steps stay finite; quality is not measured here
NEVER = 10**6  # every_k of a wrapper that only accumulates
FULL = dict(layers=2, width=128, heads=4, vocab=512, seq=32, batch=16, k=4, reps=5, window=20)
FULL["methods"] = ("AdamW", "EKFAC", "EKFAC-ra")
QUICK = dict(layers=1, width=32, heads=2, vocab=64, seq=8, batch=4, k=2, reps=1, window=2)
QUICK["methods"] = ("EKFAC-ra",)  # the smoke run: one method's three calls
MICRO_GOAL = 1.5  # "a micro-step costs about a forward/backward": at most this many


AMORTIZED = "EKFAC-ra, factors every 10"


def inner(method: str, blocks) -> optax.GradientTransformation:
    if method == "AdamW":
        return optax.adamw(LEARNING_RATE)
    if method == AMORTIZED:
        return ek.ekfac(LEARNING_RATE, blocks=blocks, scaling="running", factor_update_every=10)
    scaling = "batch" if method == "EKFAC" else "running"
    return ek.ekfac(LEARNING_RATE, blocks=blocks, scaling=scaling)


def _after_one_update(state):
    """``state`` with its preconditioners' ``count`` at 1: a real step that reads no factors."""

    def bump(node):
        if isinstance(node, ek.ScaleByEkfacState):
            return node._replace(count=node.count + 1)
        return node

    return jax.tree.map(bump, state, is_leaf=lambda n: isinstance(n, ek.ScaleByEkfacState))


def compiled_step(fn, *args):
    """``(compile seconds, compiled)`` of ``jax.jit(fn)`` on ``args``."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def runners(size: dict):
    """``{name: (step, carry)}``, each ``step(carry) -> carry`` on one fixed micro-batch."""
    model = modern_lm.DecoderLM(
        size["vocab"], size["width"], size["heads"], size["layers"], dtype=jnp.float32
    )
    loss_fn = modern_lm.make_loss(model)
    rng = np.random.default_rng(0)
    shape = (size["batch"], size["seq"])
    batch = tuple(jnp.asarray(rng.integers(0, size["vocab"], shape), jnp.int32) for _ in range(2))
    params = model.init(jax.random.key(0), batch[0])["params"]
    blocks = ek.find_blocks(loss_fn, params, *batch)
    value_and_grad = jax.value_and_grad(loss_fn)
    capture = ek.value_grad_and_stats(loss_fn)
    out = {}

    def gradient_only(carry):
        loss, grads = value_and_grad(params, *batch)
        return jax.tree.map(lambda c, g: c + g, carry, grads)

    def with_stats(carry):
        loss, grads, stats = capture(params, *batch)
        return jax.tree.map(lambda c, g: c + g, carry, grads), stats

    zeros = jax.tree.map(jnp.zeros_like, params)
    out["fwd/bwd"] = (gradient_only, zeros)
    out["capture"] = (lambda c: with_stats(c)[0], zeros)

    def train(tx, stats: bool):
        def step(carry):
            params_, state = carry
            if stats:
                _, grads, st = capture(params_, *batch)
                updates, state = tx.update(grads, state, params_, stats=st)
            else:
                _, grads = value_and_grad(params_, *batch)
                updates, state = tx.update(grads, state, params_)
            return optax.apply_updates(params_, updates), state

        return step, (params, tx.init(params))

    step, (params_, state) = train(ek.multi_steps(inner(AMORTIZED, blocks), NEVER), True)
    out[f"{AMORTIZED} micro, ek.multi_steps"] = step, (params_, _after_one_update(state))
    for method in size["methods"]:
        stats = method != "AdamW"
        out[f"{method} micro, ek.multi_steps"] = train(
            ek.multi_steps(inner(method, blocks), NEVER), stats
        )
        out[f"{method} micro, optax.MultiSteps"] = train(
            optax.MultiSteps(inner(method, blocks), NEVER), stats
        )
        out[f"{method} real step"] = train(ek.multi_steps(inner(method, blocks), 1), stats)
    return out


def measure(size: dict, log) -> dict[str, dict]:
    """Per runner: compile seconds and the median ms per call."""
    steps = {}
    for name, (step, carry) in runners(size).items():
        compile_s, compiled = compiled_step(step, carry)
        steps[name] = [compiled, jax.block_until_ready(compiled(carry)), compile_s]
        log(f"  {name}: compiled in {compile_s:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(size["reps"]):
        for name, entry in steps.items():
            compiled, carry = entry[0], entry[1]
            start = time.perf_counter()
            for _ in range(size["window"]):
                carry = compiled(carry)
            jax.block_until_ready(carry)
            times[name].append((time.perf_counter() - start) / size["window"])
            entry[1] = carry
    rows = {}
    for name, entry in steps.items():
        rows[name] = dict(compile_s=entry[2], ms=1e3 * statistics.median(times[name]))
        log(f"  {name}: {rows[name]['ms']:.2f} ms")
    return rows


def report(rows: dict[str, dict], size: dict, command: str) -> str:
    base = rows["fwd/bwd"]["ms"]
    k = size["k"]
    lines = [
        "# Gradient accumulation: the cost of a micro-step (issue 32)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}, JAX {jax.__version__}, optax {optax.__version__}",
        "",
        f"Decoder LM ({size['layers']} blocks as a loop, width {size['width']}, vocabulary "
        f"{size['vocab']}), float32, micro-batches of {size['batch']} x {size['seq']} tokens, "
        f"{k} micro-batches per real step; median of {size['reps']} windows of "
        f"{size['window']} calls, side by side in one process.",
        "",
        "| call | ms | x fwd/bwd | compile s |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['ms']:.2f} | {row['ms'] / base:.2f} | {row['compile_s']:.1f} |"
        )
    lines += [
        "",
        f"## A real step of {k} micro-batches ({k - 1} micro calls and one emitting call)",
        "",
        "| method | ek.multi_steps ms | optax.MultiSteps ms | ratio |",
        "|---|---:|---:|---:|",
    ]
    for method in size["methods"]:
        real = rows[f"{method} real step"]["ms"]
        ours = (k - 1) * rows[f"{method} micro, ek.multi_steps"]["ms"] + real
        theirs = (k - 1) * rows[f"{method} micro, optax.MultiSteps"]["ms"] + real
        lines.append(f"| {method} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")
    lines += ["", "## Goal: a micro-step costs about a forward/backward", ""]
    for method in [m for m in ("EKFAC", "EKFAC-ra") if m in size["methods"]] + [AMORTIZED]:
        micro = rows[f"{method} micro, ek.multi_steps"]["ms"]
        held = "held" if micro / base <= MICRO_GOAL else "NOT met"
        lines.append(
            f"- {method}: a micro-step of ek.multi_steps takes {micro:.2f} ms = "
            f"{micro / base:.2f}x a forward/backward ({base:.2f} ms; capture alone "
            f"{rows['capture']['ms'] / base:.2f}x); goal <= {MICRO_GOAL}x: {held}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = base_parser(__doc__, "a tiny model, one repetition (smoke test)", seed=False)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows = measure(size, log)
    command = "python -m benchmarks.accumulate" + (" --quick" if args.quick else "")
    base = rows["fwd/bwd"]["ms"]
    table = [
        dict(
            call=name,
            ms=f"{row['ms']:.4f}",
            x_fwd_bwd=f"{row['ms'] / base:.4f}",
            compile_s=row["compile_s"],
        )
        for name, row in rows.items()
    ]
    name = "accumulate" + ("_quick" if args.quick else "")
    return write_results(args.out, name, report(rows, size, command), table)


if __name__ == "__main__":
    main()
