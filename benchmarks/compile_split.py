"""Where a train step's compile time goes, against depth: capture, update, the whole step.

Issue 31's goal is a 12-block step that compiles in at most 1.5x AdamW's time. This splits the
compile of ``benchmarks/depth.py``'s models (the decoder of ``benchmarks/modern_lm.py``, float32,
width 128; blocks as a Python loop or under ``nn.scan``) into what a preconditioner adds:

- **value_and_grad**: ``jax.value_and_grad`` of the loss (what AdamW differentiates);
- **value_grad_and_stats**: ``ek.value_grad_and_stats`` of the loss (the same with each
  layer's ``h`` and ``delta``): its excess over the former is the capture's;
- **update**: ``tx.update`` alone, jitted on the gradients (and statistics) as inputs;
- **step**: the whole train step of ``modern_lm.make_step`` (differentiation, update, apply),
  as ``benchmarks/depth.py`` times it.

Each compile starts from cleared caches (``jax.clear_caches``); the median of ``compile_reps``
compiles, the parts in turn. Methods: AdamW, EKFAC-ra and EKFAC-ra with ``stack_blocks=True``
(``benchmarks/depth.py``'s).

Usage::

    python -m benchmarks.compile_split [--quick] [--out benchmarks/results] [--layouts loop,scan]
"""

import statistics
import sys
import time

import jax

import ekfac_optax as ek
from benchmarks import depth, modern_lm
from benchmarks._common import base_parser, machine_info, write_results

METHODS = ("AdamW", "EKFAC-ra", "EKFAC-ra stacked")
FULL = dict(depth.FULL, depths=(2, 12), compile_reps=3)
QUICK = dict(depth.QUICK, compile_reps=1)


def compile_seconds(fn, args, reps: int) -> float:
    """The median over ``reps`` of the seconds to lower and compile ``jax.jit(fn)(*args)``, each
    from cleared caches."""
    times = []
    for _ in range(reps):
        jax.clear_caches()
        start = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(layout: str, layers: int, size: dict, methods, log) -> list[dict]:
    """The compile time of each part on one layout and depth: its rows."""
    _, loss_fn, batch, params, blocks = depth.setup(layout, layers, size)
    capture = ek.value_grad_and_stats(loss_fn)
    _, grads, stats = jax.jit(capture)(params, *batch)
    reps = size["compile_reps"]
    parts = {
        ("-", "value_and_grad"): (jax.value_and_grad(loss_fn), (params, *batch)),
        ("-", "value_grad_and_stats"): (capture, (params, *batch)),
    }
    for method in methods:
        tx = depth.make_tx(method, blocks)
        state = tx.init(params)
        if method == "AdamW":
            parts[(method, "update")] = (tx.update, (grads, state, params))
        else:

            def update(grads, state, params, stats, tx=tx):
                return tx.update(grads, state, params, stats=stats)

            parts[(method, "update")] = (update, (grads, state, params, stats))
        step = modern_lm.make_step(method, loss_fn, tx, donate=False)
        parts[(method, "step")] = (step, (params, state, *batch))
    rows = []
    for (method, part), (fn, args) in parts.items():
        seconds = compile_seconds(fn, args, reps)
        rows.append(dict(layout=layout, depth=layers, method=method, part=part, compile_s=seconds))
        log(f"  {layout} {layers} {method} {part}: {seconds:.2f} s")
    adamw_step = next(
        r["compile_s"] for r in rows if r["method"] == "AdamW" and r["part"] == "step"
    )
    for row in rows:
        row["x_adamw_step"] = row["compile_s"] / adamw_step
    return rows


def report(rows: list[dict], size: dict, command: str) -> str:
    lines = [
        "# Where the compile time goes, against depth (issue 31)",
        "",
        f"Machine: {machine_info()}. Model: {depth.describe(size)}. Each compile from cleared "
        f"caches, the median of {size['compile_reps']}. Command: `{command}`.",
        "",
        "| layout | blocks | method | part | compile s | x AdamW's step |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['depth']} | {r['method']} | {r['part']} | "
            f"{r['compile_s']:.2f} | {r['x_adamw_step']:.2f} |"
        )
    lines += ["", "## What a preconditioner adds", ""]
    at = {(r["layout"], r["depth"], r["method"], r["part"]): r["compile_s"] for r in rows}
    for layout, layers in sorted({(r["layout"], r["depth"]) for r in rows}):
        capture = at[(layout, layers, "-", "value_grad_and_stats")]
        grad = at[(layout, layers, "-", "value_and_grad")]
        adamw = at[(layout, layers, "AdamW", "update")]
        ours = ", ".join(
            f"{m} {at[(layout, layers, m, 'update')]:.2f} s"
            for m in METHODS[1:]
            if (layout, layers, m, "update") in at
        )
        lines.append(
            f"- {layout}, {layers} blocks: the capture {capture - grad:+.2f} s over "
            f"`value_and_grad` ({grad:.2f} s); the update {ours} against AdamW's {adamw:.2f} s"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "depths 1 and 2 of a width-32 model, one compile each", False)
    parser.add_argument("--layouts", default="loop,scan", help="comma list of loop, scan")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL

    def log(text):
        print(text, file=sys.stderr, flush=True)

    rows = []
    for layout in args.layouts.split(","):
        for layers in size["depths"]:
            rows += measure(layout, layers, size, METHODS, log)
    command = "python -m benchmarks.compile_split " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    name = "compile_split" + ("_quick" if args.quick else "")
    text = report(rows, size, command.strip())
    paths = write_results(args.out, name, text, rows)
    return dict(rows=rows, report=text, paths=paths)


if __name__ == "__main__":
    main()
