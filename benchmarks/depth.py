"""Compile time and step time against depth: a transformer LM of 2, 6 and 12 blocks (issue 31).

The decoder of ``benchmarks/modern_lm.py`` (pre-norm blocks with RoPE, QK-norm, a GLU MLP,
RMSNorm, no biases, a tied embedding), float32, width 128, 4 heads, vocabulary 512, sequence 32,
batch 16 (``N T = 512`` positions per step), its blocks written two ways:

- **loop**: ``for i in range(layers): x = Block(...)(x)``, as most model code is: one
  curvature block per layer;
- **scan**: ``nn.scan`` over the block (``variable_axes={"params": 0}``): each layer kind one
  stacked block (``BlockSpec.lifted``).

Methods, side by side in one process: AdamW; ``ek.ekfac`` (batch ``s*``), EKFAC-ra, ``ek.kfac``,
``ek.kfe_adam`` with their defaults (basis every 20 steps); EKFAC-ra with ``stack_blocks=True``
(same-shaped blocks computed as one); EKFAC-ra with ``factor_update_every=10`` ("f10"); kfac-jax's
KFAC where it installs and runs on the model.

Per layout, depth and method:

- **compile**: seconds to lower and compile the jitted train step (value and gradient, with the
  layer statistics for ours; the update; apply), the median of 3 compiles, the methods in turn
  (one compile varies by +-15% on the 2-core CPU). kfac-jax jits inside its ``step``: its first
  call's time less one steady step, once;
- **step**: the median over repetitions of a window of 20 steps (a multiple of
  ``basis_update_every``, so that each window holds its eigendecompositions in proportion), the
  methods in turn (round-robin), each warmed up first.

Goals (issue 31), each printed held or NOT met: a 12-block step compiles in at most 1.5x AdamW's
compile time and at most 1.2x our own 2-block time; the 12-block EKFAC-ra step takes at most 1.5x
AdamW's.

Usage::

    python -m benchmarks.depth [--quick] [--out benchmarks/results] [--layouts loop,scan]
"""

import csv
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ekfac_optax as ek
from benchmarks import modern_lm
from benchmarks._common import base_parser, kfac_jax_optimizer, kfac_jax_status, machine_info

LEARNING_RATE = 1e-4  # small: the timed steps stay finite; quality is not measured here
EVERY = 20  # the aliases' default basis_update_every
METHODS = (
    "AdamW",
    "EKFAC",
    "EKFAC-ra",
    "KFAC",
    "KFE-Adam",
    "EKFAC-ra stacked",
    "EKFAC-ra f10",
    "kfac-jax",
)
FULL = dict(
    depths=(2, 6, 12), width=128, heads=4, vocab=512, seq=32, batch=16, reps=3, compile_reps=3
)
QUICK = dict(depths=(1, 2), width=32, heads=2, vocab=64, seq=8, batch=4, reps=1, compile_reps=1)
COMPILE_GOAL, OWN_GOAL, STEP_GOAL = 1.5, 1.2, 1.5


# --- The models -----------------------------------------------------------------------------------


class _ScanBody(nn.Module):
    """One decoder block as an ``nn.scan`` body: ``(carry, _) -> (carry, None)``."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x, _):
        return modern_lm.Block(self.width, self.heads, jnp.float32, name="block")(x), None


class ScanDecoderLM(nn.Module):
    """``modern_lm.DecoderLM`` with its blocks under ``nn.scan``."""

    vocab: int
    width: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.width, name="embed")
        blocks = nn.scan(
            _ScanBody,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )(self.width, self.heads, name="blocks")
        x, _ = blocks(embed(ids), None)
        return embed.attend(nn.RMSNorm(name="final_norm")(x))


def make_model(layout: str, layers: int, size: dict) -> nn.Module:
    if layout == "loop":
        return modern_lm.DecoderLM(
            size["vocab"], size["width"], size["heads"], layers, dtype=jnp.float32
        )
    return ScanDecoderLM(size["vocab"], size["width"], size["heads"], layers)


# --- One method's compiled step -------------------------------------------------------------------


def make_tx(method: str, blocks: dict) -> optax.GradientTransformation:
    if method == "AdamW":
        return optax.adamw(LEARNING_RATE)
    if method == "KFAC":
        return ek.kfac(LEARNING_RATE, blocks=blocks)
    if method == "KFE-Adam":
        return ek.kfe_adam(LEARNING_RATE, blocks=blocks)
    scaling = "batch" if method == "EKFAC" else "running"
    return ek.ekfac(
        LEARNING_RATE,
        blocks=blocks,
        scaling=scaling,
        stack_blocks=method.endswith("stacked"),
        factor_update_every=10 if method.endswith("f10") else 1,
    )


def ours_runner(method: str, loss_fn, params0, blocks, batch):
    """``(compile seconds, step)`` with ``step(carry) -> carry`` over ``(params, state)``."""
    tx = make_tx(method, blocks)
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    jitted = modern_lm.make_step(method, loss_fn, tx)
    start = time.perf_counter()
    compiled = jitted.lower(params, state, *batch).compile()
    compile_s = time.perf_counter() - start

    def step(carry):
        params, state, _ = compiled(carry[0], carry[1], *batch)
        return params, state, _

    return compile_s, step, (params, state, None)


def kfac_jax_runner(kfac_jax, model, params0, batch):
    """kfac-jax's KFAC (exact inverses every ``EVERY`` steps, empirical Fisher, as ours); its
    compile time is its first call's less a steady step's."""

    def loss_fn(params, batch):
        ids, labels = batch
        logits = model.apply({"params": params}, ids).astype(jnp.float32)
        kfac_jax.register_softmax_cross_entropy_loss(logits, labels)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer = kfac_jax_optimizer(kfac_jax, loss_fn, LEARNING_RATE, 1e-3, 0.95, EVERY)
    rng = jax.random.key(1)
    params = jax.tree.map(jnp.copy, params0)
    opt_state = optimizer.init(params, rng, batch)

    def step(carry):
        params, opt_state, i = carry
        params, opt_state, _ = optimizer.step(
            params, opt_state, rng, batch=batch, global_step_int=i
        )
        return params, opt_state, i + 1

    start = time.perf_counter()
    carry = jax.block_until_ready(step((params, opt_state, 0)))
    first = time.perf_counter() - start
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    return max(first - (time.perf_counter() - start), 0.0), step, carry


# --- Measurements ---------------------------------------------------------------------------------


def setup(layout: str, layers: int, size: dict):
    """``(model, loss_fn, batch, params, blocks)`` of one layout and depth (the batch's tokens
    and labels drawn with the depth as seed)."""
    model = make_model(layout, layers, size)
    loss_fn = modern_lm.make_loss(model)
    rng = np.random.default_rng(layers)
    shape = (size["batch"], size["seq"])
    batch = tuple(jnp.asarray(rng.integers(0, size["vocab"], shape), jnp.int32) for _ in range(2))
    params = model.init(jax.random.key(0), batch[0])["params"]
    return model, loss_fn, batch, params, ek.find_blocks(loss_fn, params, *batch)


def describe(size: dict) -> str:
    """The model of ``size`` in words, for the reports."""
    return (
        f"`benchmarks/modern_lm.py`'s decoder, float32, width {size['width']}, {size['heads']} "
        f"heads, vocabulary {size['vocab']}, sequence {size['seq']}, batch {size['batch']}"
    )


def measure(layout: str, layers: int, size: dict, methods, kfac_jax, log) -> list[dict]:
    """Every method on one layout and depth: its row."""
    model, loss_fn, batch, params0, blocks = setup(layout, layers, size)
    runs, skipped, compiles = {}, {}, {}
    for rep in range(size["compile_reps"]):  # round-robin: the machine's drift shared out
        for method in methods:
            if method in skipped or (method == "kfac-jax" and rep > 0):
                continue  # kfac-jax's compile is its first call's: measured once
            try:
                if method == "kfac-jax":
                    runs[method] = kfac_jax_runner(kfac_jax, model, params0, batch)
                else:
                    runs[method] = ours_runner(method, loss_fn, params0, blocks, batch)
            except Exception as e:  # kfac-jax's graph matcher on a model it does not handle
                if method != "kfac-jax":
                    raise
                skipped[method] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log(f"  {layout} {layers} kfac-jax skipped: {skipped[method]}")
                continue
            compiles.setdefault(method, []).append(runs[method][0])
            log(f"  {layout} {layers} {method}: compiled in {runs[method][0]:.1f} s")
    runs = {m: (statistics.median(compiles[m]), *run[1:]) for m, run in runs.items()}
    carries = {m: jax.block_until_ready(runs[m][1](runs[m][2])) for m in runs}  # warm-up
    times: dict[str, list[float]] = {m: [] for m in runs}
    window = 2 if size is QUICK else EVERY
    for _ in range(size["reps"]):
        for method in runs:
            carry, step = carries[method], runs[method][1]
            start = time.perf_counter()
            for _ in range(window):
                carry = step(carry)
            jax.block_until_ready(carry)
            times[method].append((time.perf_counter() - start) / window)
            carries[method] = carry
    rows = []
    base = runs["AdamW"][0], statistics.median(times["AdamW"])
    for method in runs:
        ms = 1e3 * statistics.median(times[method])
        rows.append(
            dict(
                layout=layout,
                depth=layers,
                method=method,
                compile_s=runs[method][0],
                compile_ratio=runs[method][0] / base[0],
                ms_per_step=ms,
                step_ratio=ms / (1e3 * base[1]),
                blocks=len(blocks),
            )
        )
        log(f"  {layout} {layers} {method}: {ms:.1f} ms/step ({rows[-1]['step_ratio']:.2f}x)")
    for method, reason in skipped.items():
        rows.append(dict(layout=layout, depth=layers, method=method, skipped=reason))
    return rows


# --- Report ---------------------------------------------------------------------------------------


def goals(rows: list[dict], size: dict) -> list[str]:
    """Each goal of issue 31, held or NOT met, with the numbers (deepest vs shallowest)."""
    deep, shallow = max(size["depths"]), min(size["depths"])
    at = {(r["layout"], r["depth"], r["method"]): r for r in rows if "compile_s" in r}

    def verdict(held: bool) -> str:
        return "held" if held else "NOT met"

    lines = []
    for layout in sorted({r["layout"] for r in rows}):
        for method in METHODS[1:]:
            row, low = at.get((layout, deep, method)), at.get((layout, shallow, method))
            if row is None or low is None:
                continue
            own = row["compile_s"] / low["compile_s"]
            lines.append(
                f"- {layout}, {method}: {deep}-block compile {row['compile_s']:.1f} s = "
                f"{row['compile_ratio']:.2f}x AdamW's (goal <= {COMPILE_GOAL}x: "
                f"{verdict(row['compile_ratio'] <= COMPILE_GOAL)}), {own:.2f}x our "
                f"{shallow}-block's (goal <= {OWN_GOAL}x: {verdict(own <= OWN_GOAL)})"
            )
        for method in ("EKFAC-ra", "EKFAC-ra f10"):
            row = at.get((layout, deep, method))
            if row is not None:
                lines.append(
                    f"- {layout}, {method} {deep}-block step {row['ms_per_step']:.1f} ms = "
                    f"{row['step_ratio']:.2f}x AdamW's (goal <= {STEP_GOAL}x): "
                    f"{verdict(row['step_ratio'] <= STEP_GOAL)}"
                )
    return lines


def report(rows: list[dict], size: dict, context: dict) -> str:
    lines = [
        "# Compile and step time against depth (issue 31)",
        "",
        f"Machine: {context['machine']}. Model: {describe(size)}; blocks as a Python loop or "
        "under `nn.scan`. "
        f"Compile: median of {size['compile_reps']} compiles, methods in turn. "
        f"Step: median of {size['reps']} windows of "
        f"{2 if size is QUICK else EVERY} steps, methods in turn. Command: "
        f"`{context['command']}`.",
        "",
        "| layout | blocks | method | curvature blocks | compile s | x AdamW | ms/step | x AdamW |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['layout']} | {r['depth']} | {r['method']} | | skipped: {r['skipped']} "
                "| | | |"
            )
            continue
        lines.append(
            f"| {r['layout']} | {r['depth']} | {r['method']} | {r['blocks']} | "
            f"{r['compile_s']:.1f} | {r['compile_ratio']:.2f} | {r['ms_per_step']:.1f} | "
            f"{r['step_ratio']:.2f} |"
        )
    lines += ["", "## Goals", "", *goals(rows, size)]
    if context.get("kfac_jax_reason"):
        lines.append(f"- kfac-jax not run: {context['kfac_jax_reason']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "depths 1 and 2 of a width-32 model, one short window")
    parser.add_argument("--layouts", default="loop,scan", help="comma list of loop, scan")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list (AdamW always)")
    parser.add_argument("--name", default="depth", help="the results' file name (no extension)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    methods = ["AdamW"] + [m for m in args.methods.split(",") if m in METHODS and m != "AdamW"]
    kfac_jax, reason = (None, "not asked for")
    if "kfac-jax" in methods:
        kfac_jax, reason = kfac_jax_status()
        if kfac_jax is None:
            methods.remove("kfac-jax")

    def log(text):
        print(text, file=sys.stderr, flush=True)

    rows = []
    for layout in args.layouts.split(","):
        for layers in size["depths"]:
            rows += measure(layout, layers, size, methods, kfac_jax, log)
    context = dict(
        machine=machine_info(),
        command="python -m benchmarks.depth" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        kfac_jax_reason=reason if kfac_jax is None and reason != "not asked for" else "",
    )
    text = report(rows, size, context)
    print(text)
    name = f"{args.name}_quick" if args.quick else args.name
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return dict(rows=rows, text=text)


if __name__ == "__main__":
    main()
