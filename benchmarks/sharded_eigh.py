"""The basis update spread over 1, 2, 4 and 8 devices (``mesh=``), against no spreading.

An MLP with ``--layers`` hidden Dense layers of ``--width`` units has ``2 (layers + 1)``
Kronecker factors, most of them ``(width + 1)²`` or ``width²``. For a mesh of ``D`` devices this
times, after compilation, the median of ``--reps`` runs of

- the eigendecompositions alone: ``eigh_all`` of the model's real factors, spread over the ``D``
  devices (``mesh=``) and, for comparison, every factor on every device (``mesh=None``);
- a whole data-parallel EKFAC-ra train step that updates the basis (``basis_update_every=1``),
  with the batch sharded over the ``D`` devices, with and without ``mesh=``.

Without accelerators the devices are XLA's host-platform CPU devices (8 are requested before JAX
starts), which share the machine's cores: spreading the work can then only gain up to the number
of physical cores, and the table says how many there are.

Usage::

    python -m benchmarks.sharded_eigh [--quick] [--width 512] [--layers 4] [--out DIR]
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import csv  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ekfac_optax as ek  # noqa: E402
from benchmarks._common import base_parser, machine_info  # noqa: E402
from ekfac_optax.curvature import _eigenbasis, _factors  # noqa: E402


class MLP(nn.Module):
    width: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = jnp.tanh(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def median_ms(fn, args, reps):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = base_parser(__doc__, quick="width 32, 2 layers, 2 reps", seed=False)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.reps = 32, 2, 2
    counts = [d for d in (1, 2, 4, 8) if d <= jax.device_count()]

    model = MLP(args.width, args.layers)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.width), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 10)
    params = model.init(jax.random.key(2), x)["params"]

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad_fn = ek.value_grad_and_stats(loss_fn)
    _, _, stats = jax.jit(grad_fn)(params, x, y)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    factors = [
        f
        for path, spec in blocks.items()
        for f in (
            _factors.factor_a(stats[path].h, spec.has_bias),
            _factors.factor_b(stats[path].delta),
        )
    ]
    fallbacks = [(jnp.zeros(f.shape[0]), jnp.eye(f.shape[0])) for f in factors]

    rows = []
    for d in counts:
        mesh = Mesh(np.array(jax.devices()[:d]), ("data",))
        replicated = NamedSharding(mesh, P())
        on_mesh = jax.device_put((factors, fallbacks), replicated)
        eigh_spread = median_ms(
            jax.jit(lambda f, fb, m=mesh: _eigenbasis.eigh_all(f, fb, m)), on_mesh, args.reps
        )
        eigh_every = median_ms(
            jax.jit(lambda f, fb: _eigenbasis.eigh_all(f, fb, None)), on_mesh, args.reps
        )
        steps = {}
        for spread in (True, False):
            tx = ek.ekfac(1e-3, blocks=blocks, basis_update_every=1, scaling="running",
                          mesh=mesh if spread else None)  # fmt: skip

            @jax.jit
            def step(params, state, x, y, tx=tx):
                _, grads, stats = grad_fn(params, x, y)
                updates, state = tx.update(grads, state, params, stats=stats)
                return optax.apply_updates(params, updates), state

            p = jax.device_put(params, replicated)
            state = jax.device_put(tx.init(p), replicated)
            batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
            steps[spread] = median_ms(step, (p, state, *batch), args.reps)
        rows.append(
            {
                "devices": d,
                "eigh_spread_ms": eigh_spread,
                "eigh_every_device_ms": eigh_every,
                "step_spread_ms": steps[True],
                "step_every_device_ms": steps[False],
            }
        )
        print(f"{d} devices: {rows[-1]}", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sharded_eigh.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base = rows[0]
    shapes = sorted({f.shape[0] for f in factors}, reverse=True)
    lines = [
        "# Basis update spread over devices (`mesh=`)",
        "",
        "Command: `" + " ".join(["python -m benchmarks.sharded_eigh", *argv]) + "`  ",
        f"Machine: {machine_info()}; {jax.device_count()} JAX devices "
        f"({jax.devices()[0].device_kind}); {os.cpu_count()} cores visible.",
        "",
        f"Model: {args.layers} hidden Dense layers of {args.width} units, batch {args.batch}: "
        f"{len(factors)} factors, sizes {shapes}. Milliseconds, median of {args.reps} runs after "
        "compilation; in brackets the ratio to one device.",
        "",
        "| devices | eigh, spread (`mesh=`) | eigh, every factor on every device | "
        "basis-update step, spread | basis-update step, not spread |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [
            f"{r[k]:.1f} ({r[k] / base[k]:.2f}x)"
            for k in ("eigh_spread_ms", "eigh_every_device_ms", "step_spread_ms",
                      "step_every_device_ms")
        ]  # fmt: skip
        lines.append(f"| {r['devices']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Spreading means each device decomposes about 1/D of the factors and then receives the "
        "others' results (an all-gather); without it every device decomposes every factor.",
    ]
    if jax.default_backend() == "cpu":
        lines.append(
            f"These are XLA host-platform devices sharing {os.cpu_count()} CPU cores, so the "
            f"best possible gain from spreading is about {os.cpu_count()}x, whatever D."
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "sharded_eigh.md"), "w") as f:
        f.write(text)
    print(text)
    return {"rows": rows}


if __name__ == "__main__":
    main()
