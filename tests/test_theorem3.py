"""Theorem 3 of George et al. (2018) on real data, against brute force computed here.

For a layer with per-example gradients ``G_n = [kernel_grad; bias_grad]`` (``(d_in + 1, d_out)``),
the empirical Fisher is ``G = mean_n vec(G_n) vec(G_n)ᵀ`` (row-major ``vec``, so that
``vec(h δᵀ) = h ⊗ δ`` and KFAC's approximation is ``A ⊗ B`` with ``A = E[h_aug h_augᵀ]`` and
``B = E[δδᵀ]``). With ``Q = U_A ⊗ U_B`` the Kronecker-factored eigenbasis, Theorem 3 says that
``s* = mean_n (U_Aᵀ G_n U_B)²`` minimizes ``‖G − Q diag(s) Qᵀ‖_F`` over diagonal ``s``; KFAC is
``Q diag(S_A ⊗ S_B) Qᵀ`` in the same basis, so EKFAC is at least as close to ``G`` as KFAC.

Everything is checked for each layer of a 64-32-16-10 tanh MLP trained with ``ek.ekfac`` on
scikit-learn's digits, at a few checkpoints, in float64, with dense matrices built here from
``jax.vmap(jax.grad(...))`` and a hand-written forward pass. The library's own state after one
``scaling="batch"``, ``factor_decay=0`` update is then compared through basis-invariant matrices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import MLP, digits, train_step
from reference import per_example_grads as per_example_reference

import ekfac_optax as ek

WIDTHS = (32, 16, 10)
LAYERS = ("Dense_0", "Dense_1", "Dense_2")
CHECKPOINTS = (0, 10, 30)  # training steps after which the Fisher is examined
BATCH = 256  # examples per batch, for training and for the Fisher


MODEL = MLP(WIDTHS)


def loss_fn(params, x, y):
    logits = MODEL.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def forward(params, x):
    """Hand-written forward pass (no Flax): logits and the input ``h`` of each layer."""
    hs = {}
    for i, name in enumerate(LAYERS):
        hs[name] = x
        x = x @ params[name]["kernel"] + params[name]["bias"]
        if i < len(LAYERS) - 1:
            x = jnp.tanh(x)
    return x, hs


def hand_loss(params, x, y):
    """The mean loss through the hand-written forward pass."""
    logits, _ = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


per_example_grads = jax.jit(functools.partial(per_example_reference, hand_loss))
flax_logits = jax.jit(lambda params, x: MODEL.apply({"params": params}, x))


def brute_force(params, x, y):
    """Per layer: the dense empirical Fisher and its KFAC and EKFAC approximations."""
    logits, hs = jax.jit(forward)(params, x)
    np.testing.assert_allclose(logits, flax_logits(params, x), rtol=1e-12)
    grads = per_example_grads(params, x, y)
    n = x.shape[0]
    out = {}
    for name in LAYERS:
        kernel_grad = np.asarray(grads[name]["kernel"])  # (N, d_in, d_out)
        delta = np.asarray(grads[name]["bias"])  # (N, d_out): dense layer, T = 1
        g_n = np.concatenate([kernel_grad, delta[:, None, :]], axis=1)  # (N, d_in + 1, d_out)
        h_aug = np.concatenate([np.asarray(hs[name]), np.ones((n, 1))], axis=1)
        # The hand-written forward and the per-example gradients agree: G_n = h_aug δᵀ.
        np.testing.assert_allclose(g_n, h_aug[:, :, None] * delta[:, None, :], atol=1e-14)

        vec = g_n.reshape(n, -1)
        fisher = vec.T @ vec / n
        factor_a = h_aug.T @ h_aug / n
        factor_b = delta.T @ delta / n
        eigvals_a, basis_a = np.linalg.eigh(factor_a)
        eigvals_b, basis_b = np.linalg.eigh(factor_b)
        scalings = np.mean((basis_a.T @ g_n @ basis_b) ** 2, axis=0)  # s*, (d_in + 1, d_out)
        kfe = np.kron(basis_a, basis_b)
        out[name] = dict(
            g_n=g_n,
            vec=vec,
            fisher=fisher,
            factor_a=factor_a,
            factor_b=factor_b,
            eigvals_a=eigvals_a,
            basis_a=basis_a,
            eigvals_b=eigvals_b,
            basis_b=basis_b,
            scalings=scalings,
            kfe=kfe,
            kfac=np.kron(factor_a, factor_b),
            ekfac=(kfe * scalings.reshape(-1)) @ kfe.T,
        )
    return out


@pytest.fixture(scope="module")
def training():
    """The train step and ``{step: params}`` at the checkpoints of an EKFAC training run.

    ``factor_decay=0`` and ``scaling="batch"``: from a fresh state, one step of ``train_step``
    leaves the curvature of that batch alone in the state (``test_library_...``).
    """
    x_all, y_all = digits()
    # Flax's parameter tree, filled with numpy: kernels N(0, 1/d_in), biases 0.
    rng = np.random.default_rng(0)
    params = {
        name: {
            "kernel": rng.standard_normal((d_in, d_out)) / np.sqrt(d_in),
            "bias": np.zeros(d_out),
        }
        for name, d_in, d_out in zip(LAYERS, (64,) + WIDTHS[:-1], WIDTHS, strict=True)
    }
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), x_all[:1])["params"]
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(np.shape, params)
    blocks = ek.find_blocks(loss_fn, params, x_all[:BATCH], y_all[:BATCH])
    assert list(blocks) == list(LAYERS)
    tx = ek.ekfac(
        0.1, blocks=blocks, damping=1e-2, basis_update_every=5, factor_decay=0.0, scaling="batch"
    )
    step_fn = train_step(loss_fn, tx)

    opt_state = tx.init(params)
    losses, checkpoints = [], {}
    for step in range(max(CHECKPOINTS) + 1):
        if step in CHECKPOINTS:
            checkpoints[step] = params
        if step == max(CHECKPOINTS):
            break
        idx = rng.choice(len(x_all), BATCH, replace=False)
        params, opt_state, loss = step_fn(params, opt_state, x_all[idx], y_all[idx])
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * losses[0], f"EKFAC did not train: {losses}"
    return dict(tx=tx, train_step=step_fn, checkpoints=checkpoints)


@pytest.fixture(scope="module")
def fisher_batch():
    x_all, y_all = digits()
    idx = np.random.default_rng(1).choice(len(x_all), BATCH, replace=False)
    return x_all[idx], y_all[idx]


@pytest.fixture(scope="module")
def references(training, fisher_batch):
    return {
        step: brute_force(params, *fisher_batch) for step, params in training["checkpoints"].items()
    }


def test_ekfac_is_closer_to_the_fisher_than_kfac(references):
    """Theorem 3's consequence: ‖G − G_EKFAC‖_F < ‖G − A ⊗ B‖_F for every layer and checkpoint."""
    ratios = {
        (step, name): np.linalg.norm(ref["fisher"] - ref["ekfac"])
        / np.linalg.norm(ref["fisher"] - ref["kfac"])
        for step, refs in references.items()
        for name, ref in refs.items()
    }
    report = ", ".join(f"step {s} {n}: {r:.4f}" for (s, n), r in ratios.items())
    assert all(r < 1 for r in ratios.values()), f"‖G − G_EKFAC‖ / ‖G − G_KFAC‖: {report}"


def test_scalings_are_the_optimal_diagonal_in_the_kfe(references):
    """Theorem 3 itself: s* = diag(Qᵀ G Q), so that for any diagonal s in the KFE
    ‖G − Q diag(s) Qᵀ‖² = ‖G − Q diag(s*) Qᵀ‖² + ‖s − s*‖² (Pythagoras); A ⊗ B is such a
    diagonal, s = S_A ⊗ S_B."""
    for step, refs in references.items():
        for name, ref in refs.items():
            kfe, fisher, s_star = ref["kfe"], ref["fisher"], ref["scalings"].reshape(-1)
            # diag(Qᵀ G Q) with G = VᵀV / N and the dense Q.
            np.testing.assert_allclose(
                np.mean((ref["vec"] @ kfe) ** 2, axis=0),
                s_star,
                atol=1e-12 * np.abs(fisher).max(),
                err_msg=f"step {step} {name}: s* != diag(Qᵀ G Q)",
            )
            s_kfac = np.kron(ref["eigvals_a"], ref["eigvals_b"])
            err_ekfac = np.linalg.norm(fisher - ref["ekfac"]) ** 2
            err_kfac = np.linalg.norm(fisher - ref["kfac"]) ** 2
            np.testing.assert_allclose(
                err_kfac,
                err_ekfac + np.sum((s_kfac - s_star) ** 2),
                rtol=1e-10,
                err_msg=f"step {step} {name}",
            )


def _assert_kfe_well_defined(eigvals, coordinates, name):
    """The KFE-reconstructed matrix is basis-independent when the significant eigenvalues are
    distinct: eigenvectors are then unique up to sign, and any rotation inside the (numerically)
    zero eigenspace does not matter because the data have no component there."""
    top = eigvals.max()
    significant = eigvals > 1e-9 * top
    gaps = np.diff(eigvals[significant])
    assert gaps.size == 0 or gaps.min() > 1e-7 * top, f"{name}: near-tied eigenvalues"
    assert np.abs(coordinates[..., ~significant]).max(initial=0) < 1e-6 * np.abs(coordinates).max()


def test_library_scalings_reproduce_brute_force(training, fisher_batch, references):
    """After one update from a fresh state on the Fisher batch, the library's A, B and
    (U_A ⊗ U_B) diag(s) (U_A ⊗ U_B)ᵀ equal the brute-force ones.

    The last is compared on random probe vectors P (exact for a generic P):
    Q_lib (s ⊙ Q_libᵀ P) against G_EKFAC P, with the dense Q_lib = basis_a ⊗ basis_b.
    """
    tx, train_step = training["tx"], training["train_step"]
    probes = np.random.default_rng(3).standard_normal
    for step, params in training["checkpoints"].items():
        _, opt_state, _ = train_step(params, tx.init(params), *fisher_batch)
        state = opt_state[0]
        assert isinstance(state, ek.ScaleByEkfacState) and int(state.count) == 1
        for name, ref in references[step].items():
            h_kfe = ref["basis_a"].T @ ref["g_n"]  # (N, a, b): rows of G_n in U_A's basis
            delta_kfe = ref["g_n"] @ ref["basis_b"]
            _assert_kfe_well_defined(ref["eigvals_a"], np.swapaxes(h_kfe, 1, 2), f"{name} A")
            _assert_kfe_well_defined(ref["eigvals_b"], delta_kfe, f"{name} B")

            block = state.blocks[name]
            np.testing.assert_allclose(block.factor_a, ref["factor_a"], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(block.factor_b, ref["factor_b"], rtol=1e-12, atol=1e-14)
            kfe = np.kron(np.asarray(block.basis_a), np.asarray(block.basis_b))
            scalings = np.asarray(block.scalings).reshape(-1)
            p = probes((kfe.shape[0], 16))
            scale = np.abs(ref["ekfac"] @ p).max()
            np.testing.assert_allclose(
                kfe @ (scalings[:, None] * (kfe.T @ p)),
                ref["ekfac"] @ p,
                atol=1e-9 * scale,
                err_msg=f"step {step} {name}: library EKFAC Fisher differs from brute force",
            )
            # The multiset of scalings is basis-invariant too.
            np.testing.assert_allclose(
                np.sort(scalings),
                np.sort(ref["scalings"].reshape(-1)),
                atol=1e-9 * scalings.max(),
                err_msg=f"step {step} {name}",
            )
