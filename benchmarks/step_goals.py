"""The step-time goals of issue 32: a transformer LM against AdamW, the demo's auto-encoder
against Adam.

**LM.** The decoder of ``benchmarks/modern_lm.py`` (pre-norm blocks with RoPE, QK-norm, a GLU MLP,
RMSNorm, no biases, a tied embedding) written as a Python loop, float32, width 128, 4 heads,
vocabulary 512, 4 blocks, batches of 64 sequences of 32 tokens. Methods side by side in one
process, each jitted train step compiled and warmed up first, then in turn (round-robin), the
median over repetitions of a window of 20 steps (the basis refresh every 20 steps inside it):
AdamW; ``ek.ekfac`` (batch ``s*``), EKFAC-ra, ``ek.kfac`` and ``ek.kfe_adam`` with their defaults;
EKFAC-ra, KFAC and KFE-Adam with ``factor_update_every=10`` (the factors' products on one update
in ten).

**Auto-encoder.** ``examples/demo.py``'s model (64-128-64-32-8-32-64-128-64, sigmoid, batch
100) and its four methods as the demo builds them (EKFAC, EKFAC-ra, KFAC clipped, Adam), timed
the same way; with the forward/backward alone (``jax.value_and_grad``) and the number of
operations in each compiled step (its optimized HLO's instructions outside fusions: on a CPU each
is at least one kernel launch), to show where the time of so small a step goes.

Goals (issue 32): on the LM, EKFAC-ra's and KFE-Adam's steps at most 1.3x AdamW's, EKFAC's at
most 1.6x; on the auto-encoder, at most 3x Adam's.

Usage::

    python -m benchmarks.step_goals [--quick] [--out benchmarks/results]
"""

import importlib.util
import os
import re
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
EVERY = 20
METHODS = (
    "AdamW",
    "EKFAC",
    "EKFAC-ra",
    "KFAC",
    "KFE-Adam",
    "EKFAC-ra, factors every 10",
    "KFAC, factors every 10",
    "KFE-Adam, factors every 10",
)
QUICK_METHODS = ("AdamW", "EKFAC-ra", "EKFAC-ra, factors every 10")  # the smoke run
FULL = dict(
    layers=4, width=128, heads=4, vocab=512, seq=32, batch=64, reps=5, window=EVERY, methods=METHODS
)
QUICK = dict(
    layers=1, width=32, heads=2, vocab=64, seq=8, batch=4, reps=1, window=2, methods=QUICK_METHODS
)
GOALS = {"EKFAC-ra": 1.3, "KFE-Adam": 1.3, "EKFAC": 1.6}
AE_GOAL = 3.0
DEMO = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.py"
)


def make_tx(method: str, blocks) -> optax.GradientTransformation:
    if method == "AdamW":
        return optax.adamw(LEARNING_RATE)
    name, _, amortized = method.partition(", ")
    kwargs = dict(blocks=blocks, factor_update_every=10 if amortized else 1)
    if name == "KFAC":
        return ek.kfac(LEARNING_RATE, **kwargs)
    if name == "KFE-Adam":
        return ek.kfe_adam(LEARNING_RATE, **kwargs)
    return ek.ekfac(LEARNING_RATE, scaling="batch" if name == "EKFAC" else "running", **kwargs)


def time_round_robin(runs: dict, batch: tuple, size: dict) -> dict[str, float]:
    """Median seconds per step of each ``runs[name] = [compiled, carry, ...]`` (``compiled(
    params, state, *batch) -> (params, state, loss)``), the methods in turn."""
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(size["reps"]):
        for method, entry in runs.items():
            compiled, carry = entry[0], entry[1]
            start = time.perf_counter()
            for _ in range(size["window"]):
                carry = compiled(carry[0], carry[1], *batch)
            jax.block_until_ready(carry)
            times[method].append((time.perf_counter() - start) / size["window"])
            entry[1] = carry
    return {m: statistics.median(t) for m, t in times.items()}


def hlo_operations(compiled) -> int:
    """Instructions of the optimized entry computation and its non-fusion callees (while bodies,
    conditional branches): what a CPU runs as separate kernels, roughly."""
    text = compiled.as_text()
    count = 0
    for block in re.split(r"\n\n", text):
        header = block.lstrip().split("\n", 1)[0]
        if "fused_computation" in header or "fusion" in header.split("(")[0]:
            continue
        count += sum(1 for line in block.split("\n") if " = " in line and "parameter(" not in line)
    return count


def compile_run(method, step, params, state, batch, log) -> list:
    start = time.perf_counter()
    compiled = step.lower(params, state, *batch).compile()
    compile_s = time.perf_counter() - start
    carry = jax.block_until_ready(compiled(params, state, *batch))  # warm-up
    log(f"  {method}: compiled in {compile_s:.1f} s")
    return [compiled, carry, compile_s]


def measure(size: dict, log) -> list[dict]:
    """The LM: each method's row."""
    model = modern_lm.DecoderLM(
        size["vocab"], size["width"], size["heads"], size["layers"], dtype=jnp.float32
    )
    loss_fn = modern_lm.make_loss(model)
    rng = np.random.default_rng(0)
    shape = (size["batch"], size["seq"])
    batch = tuple(jnp.asarray(rng.integers(0, size["vocab"], shape), jnp.int32) for _ in range(2))
    params0 = model.init(jax.random.key(0), batch[0])["params"]
    blocks = ek.find_blocks(loss_fn, params0, *batch)
    runs = {}
    for method in size["methods"]:
        tx = make_tx(method, blocks)
        params = jax.tree.map(jnp.copy, params0)
        step = modern_lm.make_step(method, loss_fn, tx)
        runs[method] = compile_run(method, step, params, tx.init(params), batch, log)
    return rows_of("lm", runs, time_round_robin(runs, batch, size), "AdamW", log)


def measure_autoencoder(size: dict, log) -> list[dict]:
    """The demo's auto-encoder: its methods as the demo builds them, and its fwd/bwd alone."""
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    data = demo.load_data()
    batch = (jnp.asarray(data[: demo.BATCH_SIZE]),)
    params0 = demo.model.init(jax.random.key(0), batch[0])["params"]
    blocks = ek.find_blocks(demo.loss_fn, params0, *batch)
    runs = {}
    for method, (tx, make_step) in demo.make_methods(blocks).items():
        params = jax.tree.map(jnp.copy, params0)
        runs[method] = compile_run(method, make_step(tx), params, tx.init(params), batch, log)
    grad = jax.jit(lambda p, s, x: (p, s, jax.value_and_grad(demo.loss_fn)(p, x)[0]))
    runs["fwd/bwd"] = compile_run("fwd/bwd", grad, params0, (), batch, log)
    return rows_of("autoencoder", runs, time_round_robin(runs, batch, size), "Adam", log)


def rows_of(problem: str, runs: dict, seconds: dict, base: str, log) -> list[dict]:
    """One row per method of ``runs``: its time, ratio to ``base``'s, compile time, operations."""
    rows = []
    for method, entry in runs.items():
        ratio = seconds[method] / seconds[base]
        rows.append(
            dict(
                problem=problem,
                method=method,
                ms=1e3 * seconds[method],
                ratio=ratio,
                compile_s=entry[2],
                operations=hlo_operations(entry[0]),
            )
        )
        log(f"  {problem} {method}: {1e3 * seconds[method]:.3f} ms ({ratio:.2f}x {base})")
    return rows


def report(rows: list[dict], size: dict, command: str) -> str:
    lm = [r for r in rows if r["problem"] == "lm"]
    ae = [r for r in rows if r["problem"] == "autoencoder"]
    lines = [
        "# Step time against AdamW: a transformer LM and the demo's auto-encoder (issue 32)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}",
        "",
        f"**LM**: decoder, {size['layers']} blocks as a loop, width {size['width']}, vocabulary "
        f"{size['vocab']}, float32, batch {size['batch']} x {size['seq']} tokens (N T = "
        f"{size['batch'] * size['seq']}), basis every {EVERY} steps; median of {size['reps']} "
        f"windows of {size['window']} steps, side by side in one process.",
        "",
        "| method | ms / step | x AdamW | compile s | operations |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in lm:
        lines.append(
            f"| {r['method']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['compile_s']:.1f} | "
            f"{r['operations']} |"
        )
    lines += [
        "",
        "**Auto-encoder** (`examples/demo.py`: its model, batch and methods), timed the same way; "
        "operations: instructions of the optimized step outside fusions (on a CPU, kernels).",
        "",
        "| method | ms / step | x Adam | compile s | operations |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in ae:
        lines.append(
            f"| {r['method']} | {r['ms']:.3f} | {r['ratio']:.2f} | {r['compile_s']:.1f} | "
            f"{r['operations']} |"
        )
    lines += ["", "## Goals", ""]
    at = {r["method"]: r for r in lm}
    for method, goal in GOALS.items():
        for name in (method, f"{method}, factors every 10"):
            if name in at:
                ratio = at[name]["ratio"]
                verdict = "held" if ratio <= goal else "NOT met"
                lines.append(
                    f"- LM, {name}: {ratio:.2f}x AdamW's step (goal <= {goal}x): {verdict}"
                )
    for r in ae:
        if r["method"] in ("Adam", "fwd/bwd"):
            continue
        verdict = "held" if r["ratio"] <= AE_GOAL else "NOT met"
        lines.append(
            f"- auto-encoder, {r['method']}: {r['ratio']:.2f}x Adam's step (goal <= {AE_GOAL}x): "
            f"{verdict}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = base_parser(__doc__, "a tiny model, one repetition (smoke test)", seed=False)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows = measure(size, log) + measure_autoencoder(size, log)
    command = "python -m benchmarks.step_goals" + (" --quick" if args.quick else "")
    name = "step_goals" + ("_quick" if args.quick else "")
    return write_results(args.out, name, report(rows, size, command), rows)


if __name__ == "__main__":
    main()
