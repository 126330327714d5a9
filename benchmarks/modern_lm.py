"""A language model of today's style at real vocabularies: state, memory, compile and step time.

EKFAC, EKFAC-ra and KFAC (``ek.ekfac`` / ``ek.kfac`` with their documented defaults) against
AdamW on a decoder written here, as a user would write it, outside the library: pre-norm blocks,
RoPE, QK-norm, a GLU MLP, RMSNorm, no biases, a tied embedding (``nn.Embed.attend`` as the
output layer) and bfloat16 compute with float32 parameters. Vocabularies of 512, 8,192 and 32,768
tokens (issue 29), widths and steps sized for a 2-core CPU.

Per method and vocabulary, side by side in one process:

- **state**: the bytes of ``tx.init(params)``, and the largest factor side it allocates (no
  square array with a side above ``max_factor_dim``);
- **peak memory**: XLA's buffer assignment of the compiled train step
  (``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased), the memory
  the step needs on any backend, without allocator noise;
- **compile**: seconds to lower and compile the jitted train step (value and gradient with the
  layer statistics for ours, the optimizer update, apply);
- **step**: the median over repetitions of a window of ``k`` steps (a multiple of
  ``basis_update_every``, so that each window holds its eigendecompositions in proportion), the
  methods in turn (round-robin), warmed up first.

Goals (issue 29), at 32,768 tokens: the state of EKFAC and EKFAC-ra at most 1.5x AdamW's, a step
at most 2x AdamW's, and no factor above the cap.

Usage::

    python -m benchmarks.modern_lm [--quick] [--out benchmarks/results]
"""

import csv
import os
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ekfac_optax as ek
from benchmarks._common import base_parser, machine_info
from ekfac_optax.kinds._blocks import MAX_FACTOR_DIM

METHODS = ("AdamW", "EKFAC", "EKFAC-ra", "KFAC")
LEARNING_RATE = 1e-4  # small: the timed steps stay finite; quality is not measured here
EVERY = 20  # ek.ekfac's default basis_update_every
FULL = dict(vocabs=(512, 8192, 32768), width=64, heads=4, layers=2, seq=64, batch=8, reps=5)
QUICK = dict(vocabs=(512,), width=32, heads=2, layers=1, seq=16, batch=4, reps=2)
STATE_GOAL, STEP_GOAL, GOAL_VOCAB = 1.5, 2.0, 32768


# --- The model ------------------------------------------------------------------------------------


def rope(x: jax.Array) -> jax.Array:
    """Rotary position embedding of ``(batch, seq, heads, head_dim)`` queries or keys
    (rotate-half form, base 10,000)."""
    seq, dim = x.shape[1], x.shape[-1]
    freqs = 10_000.0 ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]  # (seq, dim / 2)
    cos, sin = (f(angles)[None, :, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class Block(nn.Module):
    """Pre-norm decoder block: RMSNorm, causal attention with QK-norm and RoPE, RMSNorm, GLU."""

    width: int
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, use_bias=False)
        head_dim = self.width // self.heads
        h = nn.RMSNorm(dtype=self.dtype, name="attn_norm")(x)
        q, k, v = (
            nn.DenseGeneral((self.heads, head_dim), name=name, **kw)(h)
            for name in ("query", "key", "value")
        )
        q = rope(nn.RMSNorm(dtype=self.dtype, name="q_norm")(q))
        k = rope(nn.RMSNorm(dtype=self.dtype, name="k_norm")(k))
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + nn.DenseGeneral(self.width, axis=(-2, -1), name="out", **kw)(attended)
        h = nn.RMSNorm(dtype=self.dtype, name="mlp_norm")(x)
        hidden = 8 * self.width // 3
        gate = nn.Dense(hidden, name="gate", **kw)(h)
        up = nn.Dense(hidden, name="up", **kw)(h)
        return x + nn.Dense(self.width, name="down", **kw)(nn.silu(gate) * up)


class DecoderLM(nn.Module):
    """Tied embedding, ``layers`` pre-norm blocks, final RMSNorm, logits by ``attend``."""

    vocab: int
    width: int
    heads: int
    layers: int
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.width, dtype=self.dtype, name="embed")
        x = embed(ids)
        for i in range(self.layers):
            x = Block(self.width, self.heads, self.dtype, name=f"block_{i}")(x)
        return embed.attend(nn.RMSNorm(dtype=self.dtype, name="final_norm")(x))


def make_loss(model: nn.Module):
    def loss_fn(params, ids, labels):
        logits = model.apply({"params": params}, ids).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss_fn


# --- One method's compiled step and measurements --------------------------------------------------


def make_tx(method: str, blocks: dict) -> optax.GradientTransformation:
    if method == "AdamW":
        return optax.adamw(LEARNING_RATE)
    if method == "KFAC":
        return ek.kfac(LEARNING_RATE, blocks=blocks)
    return ek.ekfac(
        LEARNING_RATE, blocks=blocks, scaling="running" if method == "EKFAC-ra" else "batch"
    )


def make_step(method: str, loss_fn, tx, donate: bool = True, with_stats: bool | None = None):
    """The jitted train step of ``method`` (AdamW: plain gradients; ours: with the stats;
    ``with_stats`` says which for another method); ``donate`` donates the params and state (the
    timed loops), off when a run restarts from shared initial params."""
    if with_stats is None:
        with_stats = method != "AdamW"
    if not with_stats:
        grad_fn = jax.value_and_grad(loss_fn)

        def step(params, state, *batch):
            loss, grads = grad_fn(params, *batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

    else:
        capture = ek.value_grad_and_stats(loss_fn)

        def step(params, state, *batch):
            loss, grads, stats = capture(params, *batch)
            updates, state = tx.update(grads, state, params, stats=stats)
            return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def largest_factor_side(state: Any) -> int:
    """The largest side of a square array (a factor or basis) in the state; 0 if none."""
    sides = [
        x.shape[-1] for x in jax.tree.leaves(state) if x.ndim >= 2 and x.shape[-1] == x.shape[-2]
    ]
    return max(sides, default=0)


def peak_bytes(compiled) -> int | None:
    """XLA's buffer assignment of a compiled step: arguments + outputs + temporaries - aliased."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # a backend without it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def measure_vocab(vocab: int, size: dict, seed: int, log) -> list[dict]:
    """Every method on one vocabulary: its row of measurements."""
    model = DecoderLM(vocab, size["width"], size["heads"], size["layers"])
    loss_fn = make_loss(model)
    rng = np.random.default_rng(seed)
    shape = (size["batch"], size["seq"])
    batches = [  # random tokens: the cost does not depend on the text
        tuple(jnp.asarray(rng.integers(0, vocab, shape), jnp.int32) for _ in range(2))
        for _ in range(4)
    ]
    params0 = model.init(jax.random.key(seed), batches[0][0])["params"]
    blocks = ek.find_blocks(loss_fn, params0, *batches[0])
    assert blocks["embed"].tied, blocks["embed"]
    runs = {}
    for method in METHODS:
        tx = make_tx(method, blocks)
        params = jax.tree.map(jnp.copy, params0)
        state = tx.init(params)
        state_bytes, side = nbytes(state), largest_factor_side(state)
        step = make_step(method, loss_fn, tx)
        start = time.perf_counter()
        compiled = step.lower(params, state, *batches[0]).compile()
        compile_s = time.perf_counter() - start
        for i in range(2):  # warm-up, excluded
            params, state, loss = compiled(params, state, *batches[i % len(batches)])
        jax.block_until_ready(loss)
        runs[method] = dict(
            compiled=compiled,
            params=params,
            state=state,
            times=[],
            row=dict(
                vocab=vocab,
                method=method,
                param_bytes=nbytes(params0),
                state_bytes=state_bytes,
                largest_factor_side=side,
                peak_bytes=peak_bytes(compiled),
                compile_s=compile_s,
            ),
        )
        log(f"  vocab {vocab} {method}: compiled in {compile_s:.1f} s")
    window = EVERY  # a multiple of basis_update_every for every method
    for _ in range(size["reps"]):
        for method in METHODS:
            run = runs[method]
            params, state = run["params"], run["state"]
            start = time.perf_counter()
            for i in range(window):
                params, state, loss = run["compiled"](params, state, *batches[i % len(batches)])
            jax.block_until_ready((params, state, loss))
            run["times"].append((time.perf_counter() - start) / window)
            run["params"], run["state"] = params, state
            run["finite"] = bool(np.isfinite(float(loss)))
    rows = []
    adamw = runs["AdamW"]
    for method in METHODS:
        run, row = runs[method], runs[method]["row"]
        row["ms_per_step"] = 1e3 * statistics.median(run["times"])
        row["ms_min"], row["ms_max"] = 1e3 * min(run["times"]), 1e3 * max(run["times"])
        row["step_ratio"] = row["ms_per_step"] / (1e3 * statistics.median(adamw["times"]))
        row["state_ratio"] = row["state_bytes"] / adamw["row"]["state_bytes"]
        row["compile_ratio"] = row["compile_s"] / adamw["row"]["compile_s"]
        peak, base = row["peak_bytes"], adamw["row"]["peak_bytes"]
        row["peak_ratio"] = peak / base if peak and base else float("nan")
        row["finite_loss"] = run["finite"]
        rows.append(row)
        log(
            f"  vocab {vocab} {method}: {row['ms_per_step']:.1f} ms/step "
            f"({row['step_ratio']:.2f}x AdamW), state {row['state_ratio']:.2f}x"
        )
    return rows


# --- Report ---------------------------------------------------------------------------------------


def mb(n) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f}"


def report(rows: list[dict], size: dict, cap: int, quick: bool) -> str:
    lines = [
        "# A language model of today's style at real vocabularies",
        "",
        "Written by `python -m benchmarks.modern_lm" + (" --quick" if quick else "") + "`.",
        f"Machine: {machine_info()}.",
        "",
        f"Model: pre-norm decoder, {size['layers']} blocks, width {size['width']}, "
        f"{size['heads']} heads, RoPE, QK-norm (RMSNorm), GLU MLP, RMSNorm, no biases, tied "
        f"embedding (`nn.Embed.attend`), bfloat16 compute, float32 parameters; batch "
        f"{size['batch']} x {size['seq']} tokens. Optimizers with their documented defaults "
        f"(`ek.ekfac`, `ek.kfac`: basis every {EVERY} steps, `max_factor_dim` {cap}; "
        f"`optax.adamw`). Step: median of {size['reps']} windows of {EVERY} steps, methods in "
        "turn. Peak: XLA's buffer assignment of the compiled step.",
        "",
        "| vocab | method | params MB | state MB | state / AdamW | largest factor side | "
        "peak MB | peak / AdamW | compile s | compile / AdamW | ms/step | step / AdamW |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']} | {r['method']} | {mb(r['param_bytes'])} | {mb(r['state_bytes'])} | "
            f"{r['state_ratio']:.2f} | {r['largest_factor_side']} | {mb(r['peak_bytes'])} | "
            f"{r['peak_ratio']:.2f} | {r['compile_s']:.1f} | {r['compile_ratio']:.2f} | "
            f"{r['ms_per_step']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
            f"{r['step_ratio']:.2f} |"
        )
    lines += ["", "## Goals", ""]
    goal_vocab = (
        GOAL_VOCAB if any(r["vocab"] == GOAL_VOCAB for r in rows) else max(r["vocab"] for r in rows)
    )
    if goal_vocab != GOAL_VOCAB:
        lines.append(f"(quick run: checked at vocabulary {goal_vocab} instead of {GOAL_VOCAB})")
        lines.append("")
    for r in rows:
        if r["vocab"] != goal_vocab or r["method"] == "AdamW":
            continue
        checks = [("step <= 2x AdamW", r["step_ratio"] <= STEP_GOAL, f"{r['step_ratio']:.2f}x")]
        if r["method"] in ("EKFAC", "EKFAC-ra"):
            checks.insert(
                0,
                ("state <= 1.5x AdamW", r["state_ratio"] <= STATE_GOAL, f"{r['state_ratio']:.2f}x"),
            )
        checks.append(
            (
                f"no factor side above {cap}",
                r["largest_factor_side"] <= cap,
                str(r["largest_factor_side"]),
            )
        )
        for name, held, value in checks:
            lines.append(f"- {r['method']}, {name}: {'held' if held else 'NOT met'} ({value})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "one vocabulary of 512, a smaller model, 2 repetitions")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    rows = []
    for vocab in size["vocabs"]:
        rows += measure_vocab(vocab, size, args.seed, log)
    cap = MAX_FACTOR_DIM  # the preconditioners' default max_factor_dim
    name = "modern_lm_quick" if args.quick else "modern_lm"
    keys = [k for k in rows[0] if k not in ("compiled",)]
    with open(os.path.join(args.out, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    text = report(rows, size, cap, args.quick)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
    return dict(rows=rows, report=text)


if __name__ == "__main__":
    main()
