"""Data-parallel EKFAC over every device of a mesh, the eigendecompositions spread over them.

What runs: an MLP classifier on scikit-learn's digits, trained by ``ek.ekfac`` in a train step
jitted with the batch sharded over a one-axis device mesh (``"data"``) and the parameters and
optimizer state replicated. XLA inserts the cross-device sums itself; ``mesh=mesh`` makes each
device decompose a share of the Kronecker factors and all-gather the eigenbases. Before training,
the script prints what one step and one basis update communicate for this model, in bytes, from a
formula and from the collectives in the compiled step.

On a machine without accelerators the script asks XLA for ``--devices`` CPU devices (default 8):
the numbers are right, the speed is not that of real devices. Multi-host: start the same script
on every host with ``jax.distributed.initialize()`` called first (``--multi-host``); the mesh then
spans every host's devices (``jax.devices()``) and each host feeds only its rows of the batch
(``jax.make_array_from_process_local_data``), as below.

Run: ``.venv/bin/python examples/multi_device.py [--devices 8] [--steps 60] [--multi-host]``
"""

import argparse
import os
import re
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="CPU devices when no accelerator")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256, help="global batch (all devices)")
    parser.add_argument("--multi-host", action="store_true", help="jax.distributed.initialize()")
    return parser.parse_args(argv)


ARGS = parse_args()
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must be set before JAX starts; ignored by GPU and TPU backends.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    )

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import ekfac_optax as ek  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def loss_fn(params, x, y):
    logits = MLP().apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def communication(params, blocks, scaling: str, devices: int) -> dict[str, int]:
    """Bytes each step and each basis update reduce or gather, per Kronecker block summed.

    ``blocks``: ``ek.find_blocks(loss_fn, params, x, y)``, Kronecker blocks of Dense layers here.

    Per step: the gradients (every parameter) and the factor statistics ``A`` (``a² - a`` with a
    bias: ``hᵀh`` and the mean of ``h``) and ``B`` (``b²``) are all-reduced; EKFAC's batch ``s*``
    (``a·b``) too. EKFAC-ra's running ``s*`` and KFAC use the already reduced gradient. Per basis
    update, with ``mesh=``: the eigenvectors and eigenvalues (``a² + a + b² + b``) of every
    factor are all-gathered, after padding each group of same-shaped factors to a multiple of the
    device count. Sizes are the arrays' payloads; a ring all-reduce moves about ``2 (D - 1) / D``
    times that per device, an all-gather ``(D - 1) / D``.
    """
    itemsize = 4
    grads = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    # A with a bias is assembled from hᵀh (d_in²) and the mean of h (d_in): a² - a entries.
    factors = sum(
        (s.d_in**2 + s.d_in * s.has_bias + s.d_out**2) * itemsize for s in blocks.values()
    )
    scalings = sum(s.d_in_aug * s.d_out * itemsize for s in blocks.values())
    groups: dict[int, int] = {}
    for s in blocks.values():
        for d in (s.d_in_aug, s.d_out):
            groups[d] = groups.get(d, 0) + 1
    gathered = sum(
        -(-count // devices) * devices * (d * d + d) * itemsize for d, count in groups.items()
    )
    return {
        "gradients (all-reduce, every step)": grads,
        "factors A, B (all-reduce, every step)": factors,
        "batch s* (all-reduce, every step, scaling='batch')": scalings if scaling == "batch" else 0,
        "eigenbases (all-gather, per basis update)": gathered,
    }


def collective_bytes(hlo: str) -> dict[str, int]:
    """Result bytes of the all-reduce and all-gather ops of a compiled (per-device) HLO module."""
    sizes = {"f32": 4, "f64": 8, "s32": 4, "bf16": 2, "f16": 2, "pred": 1, "u32": 4}
    out = {"all-reduce": 0, "all-gather": 0}
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) (all-reduce|all-gather)(-start)?\(", line)
        if not match:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            if dtype in sizes:
                n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                out[match.group(2)] += n * sizes[dtype]
    return out


def main():
    if ARGS.multi_host:
        jax.distributed.initialize()
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    if ARGS.batch % devices.size:
        sys.exit(f"--batch {ARGS.batch} must be a multiple of the {devices.size} devices")

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)
    params = jax.device_put(MLP().init(jax.random.key(0), x_all[:1])["params"], replicated)
    # The blocks, from an abstract run of loss_fn (no FLOPs) on a batch of the global shape.
    blocks = ek.find_blocks(loss_fn, params, x_all[: ARGS.batch], y_all[: ARGS.batch])
    tx = ek.ekfac(
        0.1, blocks=blocks, damping=1e-2, basis_update_every=10, scaling="running", mesh=mesh
    )
    opt_state = jax.device_put(tx.init(params), replicated)
    grad_fn = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads, stats = grad_fn(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    def batch(i):
        # Each process supplies only its own rows of the global batch.
        rng = np.random.default_rng(i)
        rows = rng.choice(len(x_all), ARGS.batch, replace=False)
        local = slice(
            jax.process_index() * ARGS.batch // jax.process_count(),
            (jax.process_index() + 1) * ARGS.batch // jax.process_count(),
        )
        put = lambda a: jax.make_array_from_process_local_data(batch_sharding, a[rows][local])  # noqa: E731
        return put(x_all), put(y_all)

    x, y = batch(0)
    compiled = step.lower(params, opt_state, x, y).compile()
    print(f"{devices.size} devices ({jax.default_backend()}), {jax.process_count()} process(es)")
    print(ek.summarize(params, blocks))
    print("\nCommunication, bytes (formula):")
    for what, nbytes in communication(params, blocks, "running", devices.size).items():
        print(f"  {what:55s} {nbytes:>12,}")
    measured = collective_bytes(compiled.as_text())
    print("Collectives in the compiled step (results, bytes; the all-gathers run only on basis "
          "updates):")  # fmt: skip
    for op, nbytes in measured.items():
        print(f"  {op:55s} {nbytes:>12,}")

    for i in range(ARGS.steps):
        x, y = batch(i)
        params, opt_state, loss = step(params, opt_state, x, y)
        if i % 10 == 0 or i == ARGS.steps - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}")
    return float(loss)


if __name__ == "__main__":
    main()
