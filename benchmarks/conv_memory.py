"""Peak memory of a VGG-style train step at 32x32, batch 128 (issue 32).

VGG11's convolutions (3x3; 64 / 128 / 256-256 / 512-512 / 512-512 channels, a 2x2 max-pool after
each stage, a linear classifier) on 32x32x3 inputs, batch 128, float32. Per method, the peak
memory of the jitted train step (value and gradient, with the layer statistics for ours; the
update; apply) as XLA's buffer assignment plans it (``compiled.memory_analysis()``: arguments +
outputs + temporaries - aliased; the memory the step needs on any backend, without allocator
noise), against Adam's, side by side in one process. Nothing is run: each step is compiled only.

Also printed: the bytes of the statistics (``h`` and ``delta`` of every block: a convolution's
``h`` is its padded input, :class:`~ekfac_optax.kinds._patches.Patches`), which every step of ours
holds; "patches whole (before)": EKFAC and EKFAC-ra with a convolution's ``h`` captured as its
SUA patch tensor ``N T k² c_in``, as before issue 32's patch-free statistics; and
"EKFAC, s* projected first": EKFAC with the batch ``s*`` of every layer computed from the inputs
and output gradients projected into the eigenbasis (``N T a`` numbers per layer), the order the
update used for every layer before issue 32, instead of one per-example gradient at a time where
that is cheaper. (Before issue 32 the CPU also contracted some layers through the position
Gramians, ``N T² a``: that run measured 2.88x Adam's for this row, and 2.65x for EKFAC.)

Goal (issue 32): a step's peak at most 1.5x Adam's.

Usage::

    python -m benchmarks.conv_memory [--quick] [--out benchmarks/results]
"""

import contextlib
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import optax

import ekfac_optax as ek
from benchmarks._common import base_parser, machine_info, write_results
from benchmarks.convnets import VGG, VGG_WIDTHS
from benchmarks.modern_lm import peak_bytes
from ekfac_optax.curvature import _scalings
from ekfac_optax.kinds import _kinds

FULL = dict(stages=VGG_WIDTHS["paper"], image=32, batch=128)
QUICK = dict(stages=VGG_WIDTHS["quick"], image=8, batch=4)
GOAL = 1.5
WHOLE = ", patches whole (before)"
METHODS = (
    "Adam",
    "EKFAC",
    "EKFAC-ra",
    "KFAC",
    "KFE-Adam",
    "EKFAC" + WHOLE,
    "EKFAC-ra" + WHOLE,
    "EKFAC, s* projected first",
)


def patches_whole():
    """The capture as before issue 32: a convolution's ``h`` is its dense patch tensor."""
    return mock.patch.multiple(
        _kinds._Conv, probe=lambda self, h: h.dense(), from_probe=lambda self, spec, p: p
    )


def make_tx(method: str, blocks) -> optax.GradientTransformation:
    if method == "Adam":
        return optax.adam(1e-3)
    if method == "KFAC":
        return ek.kfac(1e-3, blocks=blocks)
    if method == "KFE-Adam":
        return ek.kfe_adam(1e-3, blocks=blocks)
    running = method.startswith("EKFAC-ra")
    return ek.ekfac(1e-3, blocks=blocks, scaling="running" if running else "batch")


def measure(size: dict, log) -> tuple[list[dict], list[int]]:
    model = VGG(size["stages"])
    shape = (size["batch"], size["image"], size["image"], 3)
    x, y = jnp.zeros(shape, jnp.float32), jnp.zeros((size["batch"],), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    blocks = ek.find_blocks(loss_fn, params, x, y)
    capture = ek.value_grad_and_stats(loss_fn)
    stats_bytes = []
    for context in (contextlib.nullcontext(), patches_whole()):
        with context:  # a new function: eval_shape's cache would give the last one's shapes
            stats = jax.eval_shape(ek.value_grad_and_stats(loss_fn), params, x, y)[2]
        stats_bytes.append(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(stats)))
    rows = []
    for method in METHODS:
        tx = make_tx(method, blocks)

        def step(params, state, x, y, tx=tx, method=method):
            if method == "Adam":
                grads = jax.grad(loss_fn)(params, x, y)
                updates, state = tx.update(grads, state, params)
            else:
                _, grads, st = capture(params, x, y)
                updates, state = tx.update(grads, state, params, stats=st)
            return optax.apply_updates(params, updates), state

        state = jax.eval_shape(tx.init, params)
        start = time.perf_counter()
        context = contextlib.nullcontext()
        if method.endswith("projected first"):  # the cost model always picks the projections
            context = mock.patch.object(_scalings, "rotate_first_cost", lambda *a: (0, 1))
        elif method.endswith(WHOLE):
            context = patches_whole()
        with context:
            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, y).compile()
        peak = peak_bytes(compiled)
        rows.append(dict(method=method, peak=peak, compile_s=time.perf_counter() - start))
        log(f"  {method}: peak {peak / 2**20:.0f} MiB, compiled in {rows[-1]['compile_s']:.0f} s")
    return rows, stats_bytes


def report(rows, stats_bytes, size, command) -> str:
    adam = next(r["peak"] for r in rows if r["method"] == "Adam")
    stages = " / ".join("-".join(map(str, s)) for s in size["stages"])
    lines = [
        "# Peak memory of a VGG-style step (issue 32)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}, JAX {jax.__version__}",
        "",
        f"VGG ({stages} channels, 3x3 convs), {size['image']}x{size['image']}x3 inputs, batch "
        f"{size['batch']}, float32; XLA's planned peak of the compiled train step (arguments + "
        "outputs + temporaries - aliased), nothing run. The statistics of one step (every "
        f"block's `h` and `delta`; a convolution's `h` is its padded input) take "
        f"{stats_bytes[0] / 2**20:.0f} MiB; with the patch tensors whole, as before, "
        f"{stats_bytes[1] / 2**20:.0f} MiB.",
        "",
        "| method | peak MiB | x Adam |",
        "|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['peak'] / 2**20:.1f} | {r['peak'] / adam:.2f} |")
    lines += ["", "## Goal: a step's peak at most 1.5x Adam's", ""]
    for r in rows:
        if r["method"] in ("Adam",) or r["method"].endswith(("first", WHOLE)):
            continue
        ratio = r["peak"] / adam
        lines.append(
            f"- {r['method']}: {ratio:.2f}x Adam's ({'held' if ratio <= GOAL else 'NOT met'})"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = base_parser(__doc__, "a tiny VGG on 8x8 inputs (smoke test)", seed=False)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows, stats_bytes = measure(size, log)
    command = "python -m benchmarks.conv_memory" + (" --quick" if args.quick else "")
    name = "conv_memory" + ("_quick" if args.quick else "")
    return write_results(args.out, name, report(rows, stats_bytes, size, command))


if __name__ == "__main__":
    main()
