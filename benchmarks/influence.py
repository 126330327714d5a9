"""Influence scores with the EKFAC curvature against the exact dense solve and conjugate gradients.

Issue 19's benchmark: an MLP and a CNN trained with Adam on scikit-learn's 8x8 digits (float32),
the curvature of their empirical Fisher on ``M`` training examples, and the scores
``g_qᵀ (F + λI)⁻¹ g_m`` of ``Q`` test predictions against those ``M`` examples (1,000 x 100), with
``λ = k x`` the Fisher's mean eigenvalue (``tr F / P``, the same for every method; ``k`` of
``DAMPINGS``, timed at the first):

- **EKFAC**: ``ek.fit_curvature`` over the ``M`` examples (factors, eigenbasis, then ``s*``), then
  ``ek.influence`` (one solve per query in the eigenbasis, one ``(Q, P) x (P, M)`` product);
- **KFAC**: the same with ``method="kfac"`` (``T A ⊗ B``, one pass);
- **dense**: the ``P x P`` empirical Fisher ``Gᵀ G / M`` of the per-example gradients ``G``, and
  ``jnp.linalg.solve`` for the ``Q`` queries (the exact scores, where ``P²`` fits in memory);
- **dense per layer**: the same without the blocks between layers (the best a block-diagonal
  curvature such as EKFAC's can do; it tells the Kronecker factorisation's error from the
  block-diagonal one's);
- **CG**: ``jax.scipy.sparse.linalg.cg`` on the Fisher-vector product ``Gᵀ(G v) / M`` (matrix-free
  but holding ``G``), one solve per query (``jax.vmap``), at most ``--cg-iters`` iterations.

Reported per model and method: the seconds (the per-example gradients shared by all three are
timed apart; each method's fit and scores, jitted, after one compilation; EKFAC's fit is one call
of ``ek.fit_curvature``, its compilation included), the bytes of what the
method holds (EKFAC: the operator's arrays; dense: the ``P x P`` matrix; CG: ``G``), the peak
temporary bytes XLA allocates for its compiled scoring (``memory_analysis``), and the agreement
of its scores with the exact ones: Spearman's rank correlation over the ``M`` examples, the mean
over the queries, and the overlap of the 10 highest-scoring examples (also for the plain
gradient dot product, which ignores the curvature).

Usage::

    python -m benchmarks.influence [--quick] [--train 1000] [--queries 100] [--cg-iters 100]
        [--out benchmarks/results]

writes ``influence.md`` and ``influence.csv`` (``influence_quick.*`` with ``--quick``).
"""

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import ekfac_optax as ek
from benchmarks._common import base_parser, machine_info, write_results

FULL = dict(width=64, channels=(8, 16), epochs=30)
QUICK = dict(width=8, channels=(2, 4), epochs=1)
TOP = 10  # the overlap of the top-TOP examples
DAMPINGS = (0.1, 1.0, 10.0)  # x the Fisher's mean eigenvalue; times and memory at the first


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = jnp.tanh(nn.Dense(self.width)(x))
        x = jnp.tanh(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    channels: tuple

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = jnp.tanh(nn.Conv(c, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def digits(seed: int):
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order], data.target[order].astype(np.int32)


def trained(model, x, y, epochs: int, seed: int):
    """Parameters after ``epochs`` of Adam (batch 64) on ``(x, y)``."""
    params = model.init(jax.random.key(seed), x[:1])["params"]

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state

    state, rng = tx.init(params), np.random.default_rng(seed)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(x)), max(len(x) // 64, 1)):
            params, state = step(params, state, x[batch], y[batch])
    return params, loss_fn


def timed(fn, *args):
    """``(result, seconds)`` of a second call (the first compiles)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def temp_bytes(fn, *args) -> int:
    """XLA's temporary allocation for the compiled ``fn(*args)`` (0 where not reported)."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0)


def flat(tree) -> jax.Array:
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1)


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v)) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def agreement(scores: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """Mean over queries of Spearman's correlation and of the top-``TOP`` overlap."""
    rho = np.mean([spearman(s, e) for s, e in zip(scores, exact, strict=True)])
    top = np.mean(
        [
            len(set(np.argsort(-s)[:TOP]) & set(np.argsort(-e)[:TOP])) / TOP
            for s, e in zip(scores, exact, strict=True)
        ]
    )
    return float(rho), float(top)


def measure(name, model, size, args, log) -> list[dict]:
    images, labels = digits(args.seed)
    m, q = args.train, args.queries
    x_train, y_train = images[:m], labels[:m]
    x_query, y_query = images[-q:], labels[-q:]
    params, loss_fn = trained(model, x_train, y_train, size["epochs"], args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log(f"{name}: {n_params} parameters")

    grads_fn = jax.jit(lambda p, x, y: ek.per_example_grads(loss_fn, p, x, y, chunk_size=250))
    train_grads, grad_seconds = timed(grads_fn, params, x_train, y_train)
    query_grads = grads_fn(params, x_query, y_query)
    g, gq = flat(train_grads), flat(query_grads)
    mean_eigenvalue = float(jnp.sum(g**2)) / m / n_params  # tr(F) / P
    dampings = [k * mean_eigenvalue for k in DAMPINGS]

    # Dense: the exact scores, one solve per damping.
    fisher, dense_fit = timed(jax.jit(lambda g: g.T @ g / g.shape[0]), g)

    def dense_scores(fisher, gq, g, damping):
        solved = jnp.linalg.solve(fisher + damping * jnp.eye(len(fisher)), gq.T).T
        return solved @ g.T

    dense_jit = jax.jit(dense_scores)
    exact = [np.asarray(dense_jit(fisher, gq, g, d)) for d in dampings]
    _, dense_score = timed(dense_jit, fisher, gq, g, dampings[0])

    # EKFAC and KFAC: fit once, then score.
    blocks = ek.find_blocks(loss_fn, params, x_train[:2], y_train[:2])
    batches = [(x_train[i : i + 250], y_train[i : i + 250]) for i in range(0, m, 250)]
    fitted = {}
    for method in ("ekfac", "kfac"):
        start = time.perf_counter()
        op = ek.fit_curvature(loss_fn, params, batches, blocks, method=method)
        jax.block_until_ready(op.trace())
        fitted[method] = op, time.perf_counter() - start
    influence = jax.jit(ek.influence)

    # CG: matrix-free on G.
    def cg_scores(g, gq, damping):
        def matvec(v):
            return g.T @ (g @ v) / g.shape[0] + damping * v

        def one(b):
            return jax.scipy.sparse.linalg.cg(matvec, b, tol=1e-6, maxiter=args.cg_iters)[0]

        return jax.vmap(one)(gq) @ g.T

    cg_jit = jax.jit(cg_scores)
    rows = []

    def row(method, scores_at, fit_s, score_s, held, temp):
        out = dict(
            model=name,
            params=n_params,
            method=method,
            fit_s=round(fit_s, 4),
            score_s=round(score_s, 4),
            total_s=round(fit_s + score_s, 4),
            held_mb=round(held / 1e6, 3),
            temp_mb=round(temp / 1e6, 3),
            grads_s=round(grad_seconds, 4),
        )
        for k, d, e in zip(DAMPINGS, dampings, exact, strict=True):
            rho, top = agreement(np.asarray(scores_at(d)), e)
            out[f"spearman_{k:g}"], out[f"top10_{k:g}"] = round(rho, 4), round(top, 3)
        rows.append(out)
        log(f"  {method}: {out}")

    for method, label in (("ekfac", "EKFAC"), ("kfac", "KFAC")):
        op, fit_s = fitted[method]
        _, score_s = timed(influence, op, train_grads, query_grads, dampings[0])
        row(
            label,
            lambda d, op=op: influence(op, train_grads, query_grads, d),
            fit_s,
            score_s,
            nbytes((op.blocks, op.fallback)),
            temp_bytes(ek.influence, op, train_grads, query_grads, dampings[0]),
        )
    row(
        "dense",
        lambda d: exact[dampings.index(d)],
        dense_fit,
        dense_score,
        fisher.nbytes,
        temp_bytes(dense_scores, fisher, gq, g, dampings[0]),
    )
    # Dense per layer: the exact curvature without its cross-layer blocks (what a block-diagonal
    # method such as EKFAC can reach at best); a layer's parameters are consecutive in `flat`.
    sizes = [sum(x.size for x in jax.tree.leaves(layer)) for layer in params.values()]
    bounds = list(zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True))

    def per_layer_scores(fisher, gq, g, damping):
        total = 0.0
        for a, b in bounds:
            eye = jnp.eye(b - a)
            solved = jnp.linalg.solve(fisher[a:b, a:b] + damping * eye, gq[:, a:b].T).T
            total = total + solved @ g[:, a:b].T
        return total

    per_layer = jax.jit(per_layer_scores)
    _, per_layer_score = timed(per_layer, fisher, gq, g, dampings[0])
    row(
        "dense per layer (block-diagonal)",
        lambda d: per_layer(fisher, gq, g, d),
        dense_fit,
        per_layer_score,
        sum((b - a) ** 2 for a, b in bounds) * fisher.dtype.itemsize,
        temp_bytes(per_layer_scores, fisher, gq, g, dampings[0]),
    )
    _, cg_score = timed(cg_jit, g, gq, dampings[0])
    row(
        f"CG ({args.cg_iters} iterations)",
        lambda d: cg_jit(g, gq, d),
        0.0,
        cg_score,
        g.nbytes,
        temp_bytes(cg_scores, g, gq, dampings[0]),
    )
    row("gradient dot product", lambda d: gq @ g.T, 0.0, 0.0, 0, 0)
    return rows


def report(rows, args, command) -> str:
    ks = [f"{k:g}" for k in DAMPINGS]
    lines = [
        "# Influence scores: EKFAC against the exact dense solve and CG (issue 19)",
        "",
        f"Command: `python -m benchmarks.influence {' '.join(command)}`  ",
        f"Machine: {machine_info()}",
        "",
        f"{args.train} training examples x {args.queries} queries (8x8 digits, models trained "
        "with Adam, float32); the empirical Fisher of the training examples, damping "
        f"`λ = k x` its mean eigenvalue `tr F / P`, `k` in {', '.join(ks)} (times and memory at "
        f"k = {ks[0]}, kronfluence's choice). Seconds after one compilation, except the fits: "
        "one call of `ek.fit_curvature`, which compiles its jitted step on every call; `held`: "
        "what the method keeps (EKFAC/KFAC: the operator; dense: the P x P Fisher, per layer its "
        "diagonal blocks; CG: the "
        "per-example gradients G); `temp`: XLA's temporary bytes for the compiled scoring. "
        "The per-example gradients, which every method needs, took `grads` seconds.",
        "",
        "| model | P | method | fit s | scores s | total s | held MB | temp MB | grads s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']} | {r['method']} | {r['fit_s']:.3f} | "
            f"{r['score_s']:.3f} | {r['total_s']:.3f} | {r['held_mb']:.2f} | "
            f"{r['temp_mb']:.2f} | {r['grads_s']:.3f} |"
        )
    lines += [
        "",
        "Agreement with the exact scores at each damping: Spearman's rank correlation over the "
        f"{args.train} training examples / the overlap of the {TOP} highest-scoring ones, means "
        "over the queries.",
        "",
        "| model | method | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|---|" + "---:|" * len(ks),
    ]
    for r in rows:
        cells = [f"{r[f'spearman_{k}']:.3f} / {r[f'top10_{k}']:.2f}" for k in ks]
        lines.append(f"| {r['model']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "tiny models, 64 examples x 8 queries, 10 CG iterations")
    parser.add_argument("--train", type=int, default=None, help="training examples (1000)")
    parser.add_argument("--queries", type=int, default=None, help="queries (100)")
    parser.add_argument("--cg-iters", type=int, default=None, help="CG iterations (100)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    args.train = args.train or (64 if args.quick else 1000)
    args.queries = args.queries or (8 if args.quick else 100)
    args.cg_iters = args.cg_iters or (10 if args.quick else 100)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    rows = []
    for name, model in (("MLP", MLP(size["width"])), ("CNN", CNN(size["channels"]))):
        rows += measure(name, model, size, args, log)
    command = sys.argv[1:] if argv is None else argv
    name = "influence" + ("_quick" if args.quick else "")
    return write_results(args.out, name, report(rows, args, command), rows)


if __name__ == "__main__":
    main()
