"""EKFAC, EKFAC-ra, KFAC and KFE-Adam as optax gradient transformations.

Per Kronecker block (see ``_kinds``) with ``h_aug = [h; 1]`` and output
gradients ``delta``, the per-example gradient is
``G_n = Σ_t h_aug_{n,t} delta_{n,t}ᵀ`` and the update is
``U_A [(U_Aᵀ g U_B) / (s + damping)] U_Bᵀ`` where ``U_A``, ``U_B`` are the
eigenvectors of ``A = E[h_aug h_augᵀ]`` and ``B = E[delta deltaᵀ]`` (the
Kronecker-factored eigenbasis, KFE) and ``s`` the scalings (``_scalings``).

References:
  George, Laurent, Bouthillier, Ballas, Vincent. Fast Approximate Natural
  Gradient Descent in a Kronecker-factored Eigenbasis. NeurIPS 2018.
  https://arxiv.org/abs/1806.03884
  Martens & Grosse. Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature. ICML 2015. https://arxiv.org/abs/1503.05671
  Grosse & Martens. A Kronecker-factored approximate Fisher matrix for
  convolution layers. ICML 2016. https://arxiv.org/abs/1602.01407
"""

import numbers
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ekfac_optax.curvature import _factors, _scalings
from ekfac_optax.kinds import _blocks, _kinds
from ekfac_optax.update import (
    _docstrings,
    _microbatch,
    _stacking,
    _stages,
    _state,
    _step,
    _validation,
)
from ekfac_optax.update._state import ScaleByEkfacState

Fallback = Literal["diagonal", "identity"]
ScalarOrSchedule = jax.typing.ArrayLike | optax.Schedule


def _replace_leaves(tree: Any, new: Mapping[str, jax.Array]) -> Any:
    """``tree`` with the leaves at the parameter paths of ``new`` replaced."""

    def pick(key_path, leaf):
        return new.get(_blocks.path_key(key_path), leaf)

    return jax.tree_util.tree_map_with_path(pick, tree)


def _scale_by_kfe(
    blocks: Mapping[str, _blocks.BlockSpec],
    damping: ScalarOrSchedule,
    embedding_damping: ScalarOrSchedule | None,
    basis_update_every: jax.typing.ArrayLike,
    config: _stages.Config,
    fallback: Fallback,
    mesh: Mesh | None,
    max_factor_dim: int | None,
    stack_blocks: bool,
) -> optax.GradientTransformationExtraArgs:
    """The shared machinery of :func:`scale_by_ekfac` and :func:`scale_by_kfac`."""
    blocks = _blocks.with_cap(_blocks.checked(blocks, "scale_by_ekfac"), max_factor_dim)
    if not isinstance(stack_blocks, bool):
        raise TypeError(f"stack_blocks must be True or False, got {stack_blocks!r}")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    _validation.check_hyperparameters(
        basis_update_every, config.factor_decay, config.factor_update_every
    )
    config.rule.check()
    _validation.check_choice(
        "damping_mode", config.damping_mode, ("tikhonov", "factored", "relative")
    )
    _validation.check_damping("damping", damping, config.damping_mode)
    if embedding_damping is not None:  # None: damping
        _validation.check_damping("embedding_damping", embedding_damping, config.damping_mode)
    _validation.check_choice("weight_sharing", config.weight_sharing, ("expand", "reduce"))
    _validation.check_choice("fallback", fallback, ("diagonal", "identity"))
    stored = _stacking.plan(blocks, stack_blocks)  # the state's entries: groups of blocks

    def init_fn(params):
        params = _blocks.as_arrays(params)  # nnx.Optimizer passes nnx.Param variables
        _blocks.check_params(params, blocks, "init")
        _validation.check_finite_params(params, "init")
        leaves = _blocks.fallback_leaves(params, blocks) if fallback == "diagonal" else {}
        return ScaleByEkfacState(
            count=jnp.zeros([], jnp.int32),
            skipped=jnp.zeros([], jnp.int32),
            blocks={key: _state.init_block(g.spec, config.rule) for key, g in stored.items()},
            fallback={
                path: config.rule.init(
                    jnp.shape(leaf), _blocks.curvature_dtype(jnp.result_type(leaf))
                )
                for path, leaf in leaves.items()
            },
        )

    def update_fn(updates, state, params=None, *, stats=None, **extra_args):
        del params
        if stats is None and extra_args:  # e.g. stat=: optax.chain forwards any keyword
            raise TypeError(
                f"scale_by_ekfac.update got the keyword argument(s) {sorted(extra_args)} and no "
                "stats=...; pass the third output of ek.value_grad_and_stats as stats=stats"
            )
        # Every product of the curvature (factors, bases, scalings) at full float32 precision:
        # a TPU's or GPU's default (bfloat16 passes, TF32) would round the eigenbasis rotations.
        with jax.default_matmul_precision("highest"):
            if isinstance(state, _microbatch.Accumulating):
                return _accumulating(updates, state, stats)
            return _update(updates, state, stats)

    decay = config.factor_decay
    one_batch = isinstance(decay, numbers.Real) and decay == 0

    def on_updates_every(every, count):
        """Whether update ``count`` is one of ``0, every, 2 every, ...``: ``True`` (static) for
        ``every == 1``, else a ``()`` bool array."""
        if isinstance(every, numbers.Integral) and every == 1:
            return True
        return count % every == 0

    def when(predicate, fn, tree):
        """``fn(tree)`` if ``predicate`` else ``tree``, by ``lax.cond`` unless it is static."""
        return fn(tree) if predicate is True else jax.lax.cond(predicate, fn, lambda t: t, tree)

    def refreshes(count):
        """Whether update ``count`` computes the eigenbasis."""
        return on_updates_every(basis_update_every, count)

    def factors_used(count):
        """Whether update ``count`` reads this batch's factors (with one-batch factors, only a
        basis update does)."""
        return (
            refreshes(count) if one_batch else on_updates_every(config.factor_update_every, count)
        )

    def amortization(specs):
        """``(every, amortized)``: the blocks ``specs`` whose factors are averaged in on every
        update (``_step.factors_every_update``; none with ``factor_update_every=1``) and those
        averaged in on the updates of :func:`factors_used`."""
        m = config.factor_update_every  # an int, or traced under optax.inject_hyperparams
        static_one = isinstance(m, numbers.Integral) and m == 1
        every = [k for k, s in specs.items() if not static_one and _step.factors_every_update(s)]
        return every, [k for k in specs if k not in every]

    def _accumulating(updates, accumulating, stage):
        """A stage of an accumulated step (``_microbatch``, driven by ``multi_steps``)."""
        state, pending = accumulating
        specs = _validation.check_update(_blocks.as_arrays(updates), state, blocks, stored)
        layers = _stacking.unstack(stored, state.blocks)  # the sums are kept per layer
        if isinstance(stage, _microbatch.Allocate):
            zeros = _microbatch.zeros(specs, layers, config.rule)
            return updates, _microbatch.Accumulating(state, zeros)
        if not isinstance(stage, _microbatch.Micro | _microbatch.Emit):
            raise TypeError(f"an accumulating state needs stats of a micro-batch, got {stage!r}")
        _validation.check_stats(stage.stats, specs)
        every, _ = amortization(specs)
        total = _microbatch.accumulate(
            pending, specs, layers, stage.stats, config, factors_used(state.count), every
        )
        if isinstance(stage, _microbatch.Micro):
            return jax.tree.map(jnp.zeros_like, updates), _microbatch.Accumulating(state, total)
        new_updates, new_state = _update(updates, state, stage.stats, _microbatch.means(total))
        return new_updates, _microbatch.Accumulating(
            new_state, jax.tree.map(jnp.zeros_like, pending)
        )

    def _update(updates, state, stats, accumulated=None):
        # An nnx.State of variables (split + jax.jit): work on its arrays, return its structure.
        structure = jax.tree.structure(updates)
        updates = _blocks.as_arrays(updates)
        specs = _validation.check_update(updates, state, blocks, stored)
        _validation.check_stats(stats, specs)
        count = state.count
        damping_now = damping(count) if callable(damping) else damping
        embedding_now = damping_now if embedding_damping is None else embedding_damping
        embedding_now = embedding_now(count) if callable(embedding_now) else embedding_now
        if accumulated is not None:
            accumulated["refreshed"] = refreshes(count)

        batch = _step.prepare(
            specs,
            updates,
            stats,
            count,
            damping_now,
            embedding_now,
            stack_blocks,
            **(accumulated or {}),
        )

        # With one-batch factors (factor_decay=0) only the basis updates need them.
        new_blocks = _stacking.regroup(stored, batch.groups, state.blocks)
        if not one_batch:  # on updates 0, m, 2m, ..., debiased by their number (m = 1: count)
            every, amortized = amortization(batch.group_specs)
            if every:  # embeddings: on every update
                new_blocks = _step.factors(batch, new_blocks, config, count, every)

            def new_factors(blocks):
                m = config.factor_update_every
                return _step.factors(batch, blocks, config, count // m, amortized)

            if amortized:
                new_blocks = when(factors_used(count), new_factors, new_blocks)

        # Amortized: the eigenbasis on updates 0, n, 2n, ...
        def new_basis(blocks):
            blocks = _step.factors(batch, blocks, config) if one_batch else blocks
            return _step.basis(batch, blocks, mesh, config)

        new_blocks = when(refreshes(count), new_basis, new_blocks)

        preconditioned, new_blocks = _step.precondition(batch, new_blocks, config)
        leaves = _blocks.fallback_leaves(updates, blocks)
        passed, fallback_updates, new_fallback = leaves, {}, {}  # "identity": passed through
        if fallback == "diagonal":
            passed = {}
            fallback_updates, new_fallback = _stages.fallback(
                leaves, state.fallback, batch.n, count, damping_now, config
            )
        finite = _step.guard(
            batch,
            preconditioned,
            new_blocks,
            one_batch,
            config.rule,
            (passed, fallback_updates, new_fallback),
        )

        # A non-finite update changes nothing but `skipped`: the selects on the groups' arrays,
        # before they are cut into layers (one per group, not one per layer).
        applied = ScaleByEkfacState(
            count=optax.safe_increment(count),
            skipped=state.skipped,
            blocks=_stacking.regroup(batch.groups, stored, new_blocks),
            fallback=new_fallback,
        )
        rejected = state._replace(skipped=optax.safe_increment(state.skipped))
        outputs = (applied, preconditioned, fallback_updates, passed)
        zeros = jax.tree.map(jnp.zeros_like, outputs[1:])
        new_state, preconditioned, fallback_updates, passed = _step.select(
            finite, outputs, (rejected, *zeros)
        )

        # Write back per layer.
        preconditioned = _stacking.unstack(batch.groups, preconditioned)
        new_layers = {
            path: _kinds.from_matrix(preconditioned[path], _blocks.subtree(updates, path), spec)
            for path, spec in specs.items()
        }
        new_updates = _replace_leaves(
            _blocks.replace_blocks(updates, new_layers), {**passed, **fallback_updates}
        )
        return jax.tree.unflatten(structure, jax.tree.leaves(new_updates)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_ekfac(
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    damping: ScalarOrSchedule = 1e-3,
    embedding_damping: ScalarOrSchedule | None = None,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    scaling: _scalings.ScalingName = "batch",
    scaling_decay: jax.typing.ArrayLike = 0.95,
    damping_mode: _scalings.DampingMode = "tikhonov",
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions with EKFAC: a diagonal scaling in the Kronecker-factored eigenbasis.

    For each Kronecker block (see :func:`ekfac_optax.find_blocks`; ``g`` the
    ``(d_in + 1, d_out)`` matrix ``[W; b]`` of the incoming update):

    .. math::
      U_A \left[ (U_A^\top g U_B) \oslash (s + \epsilon) \right] U_B^\top

    with ``U_A``, ``U_B`` the eigenvectors of the factors ``A = E[h_aug h_augᵀ]``
    and ``B = E[delta deltaᵀ]`` (means over examples and positions, debiased
    moving averages with ``factor_decay``; ``0`` uses the current batch alone),
    recomputed on updates ``0, n, 2n, ...`` for ``n = basis_update_every``.
    The scalings ``s`` are re-estimated every update:

    - ``scaling="batch"`` (Algorithm 1): ``s = mean_n (U_Aᵀ G_n U_B)²`` from
      the per-example gradients ``G_n = Σ_t h_aug_{n,t} delta_{n,t}ᵀ`` of the
      current batch (``stats``).
    - ``scaling="running"`` (EKFAC-ra): ``s ← d s + (1 - d) N (U_Aᵀ g U_B)²``
      with ``d = scaling_decay``, ``N`` the batch size and ``g`` the incoming
      update (the minibatch gradient when this is first in the chain). The
      factor ``N`` makes ``s`` estimate the same per-example second moment as
      ``"batch"``, so ``damping`` means the same in both. At each basis change
      ``s`` restarts from KFAC's ``T S_A ⊗ S_B``.

    A stacked block (the copies of a layer in ``nn.scan`` / ``nn.vmap``, the groups of a
    grouped convolution, ``DenseGeneral`` batch dims) is that many such blocks. An
    embedding is a block with one-hot inputs, so ``A`` is the diagonal of token
    frequencies and ``U_A = I``. The scale and shift
    of a normalisation layer is a diagonal block, ``g / (s + ε)`` with ``s =
    mean_n G_n²`` from its exact per-example gradients (``"batch"``) or the
    debiased average of ``N g²`` (``"running"``). Every other parameter gets
    the ``fallback``: ``"diagonal"`` divides by ``s + ε`` with ``s`` the debiased
    average (decay ``scaling_decay``) of ``N g²`` (EKFAC-ra with the identity
    basis), ``"identity"`` passes it unchanged. :func:`ekfac_optax.summarize`
    lists what each parameter gets.

    Dtypes: the curvature (factors, bases, scalings, the fallback's averages) is kept in
    float32 for 16-bit parameters and in the parameters' dtype otherwise; ``stats`` computed
    in bfloat16 (``dtype=jnp.bfloat16`` layers with float32 parameters) are cast to it, every
    product of the curvature runs at ``HIGHEST`` matmul precision, and the updates come back
    in each parameter's dtype.

    Non-finite numbers never enter the state: an update whose incoming
    gradient, ``stats`` or result holds a NaN or Inf returns zeros and leaves
    the state as it was, except ``skipped`` which counts such updates (and
    ``count``, which counts applied updates only, does not move). A failed
    ``eigh`` keeps that factor's previous eigenbasis.

    Args:
      blocks: the model's blocks, ``ek.find_blocks(loss_fn, params, *batch)``, or
        a subset of them (then pass ``layers=blocks`` to ``value_grad_and_stats``).
      damping: ``ε >= 0`` added to the scalings, a float or an optax schedule of
        the update count. ``ε = 0`` gives the pseudo-inverse: directions whose
        scaling is 0 up to round-off (relative ``max(a, b) · eps``) get no step.
      embedding_damping: the damping of the embeddings' blocks (``nn.Embed``, tied or not), a
        float or a schedule, in the same ``damping_mode``; ``None`` (default): ``damping``.
        An embedding's scalings follow its tokens' frequencies, and most tokens of a large
        vocabulary are rare: a relative damping's mean scaling is then mostly theirs, and the
        rows of the rare tokens, estimated from a few occurrences, get steps divided by little
        more than a damping that shrinks as the vocabulary grows.
      basis_update_every: recompute the eigenbasis every this many updates.
      factor_decay: decay of the moving averages of ``A`` and ``B``, in ``[0, 1)``.
      factor_update_every: average this batch's ``A`` and ``B`` into the factors on updates
        ``0, m, 2m, ...`` only (an int ``m >= 1``; the debiasing counts those updates). Their
        products, ``2 N T (a² + b²)`` per block, are two thirds of a forward/backward pass
        for square layers: with ``m > 1`` EKFAC-ra's, KFAC's and KFE-Adam's steps between them
        cost the projections alone (EKFAC's batch ``s*`` is measured every update). The
        eigenbasis then comes from factors up to ``m - 1`` updates old. An embedding's factors
        are still averaged in on every update (a count of the batch's tokens and one
        ``d_out²`` product): a batch sees only some tokens, and from every m-th batch alone a
        token of the others keeps a zero frequency and a step divided by the damping alone.
      scaling: ``"batch"`` (EKFAC) or ``"running"`` (EKFAC-ra).
      scaling_decay: decay of the running averages (``scaling="running"``, the
        fallback), in ``[0, 1)``.
      damping_mode: ``"tikhonov"`` (``s + ε``), ``"factored"``
        (``s + ε + √ε (T S_A ⊕ S_B)``, the paper's Appendix C; diagonal blocks
        and the fallback use ``s + ε``) or ``"relative"`` (``s + ε · mean(s)`` per block,
        diagonal blocks and fallback parameters included: ``ε > 0`` is a fraction of each
        block's mean scaling, as kronfluence's ``0.1 × mean eigenvalue``, so that one value
        fits layers whose curvature differs by orders of magnitude).
      weight_sharing: how the factors of a layer with several positions per
        example (conv, sequence axes, repeated calls) are estimated:
        ``"expand"`` (every position a sample; KFAC's block ``T A ⊗ B``) or
        ``"reduce"`` (K-FAC-reduce: ``A`` from the per-example mean of ``h_aug``
        over positions, ``B`` from the per-example sum of ``delta``; KFAC's block
        ``A ⊗ B``). Embeddings always expand.
      fallback: ``"diagonal"`` or ``"identity"``, for the parameters in no block.
      mesh: a ``jax.sharding.Mesh`` over whose devices the eigendecompositions
        are spread: each factor is decomposed on one device and the results are
        all-gathered. ``None``: every device decomposes every factor. Data
        parallelism needs no argument: jit the train step with the batch sharded
        and XLA reduces the gradients, factors and scalings across devices.
      max_factor_dim: the largest factor side that gets an eigenbasis. A side of a block
        above it (``d_in + 1`` or ``d_out``: a language model's vocabulary, a wide MLP)
        keeps only its diagonal, with the identity as its basis, as an embedding's
        input side does: the block then costs ``O(a² + b)`` memory and ``O(a³)`` per
        basis update instead of ``O(a² + b²)`` and ``O(a³ + b³)``, and ``s`` is
        EKFAC's best diagonal in the basis ``U_A ⊗ I`` (KFAC: ``T S_A ⊗ diag(B)``).
        Both sides above it: the identity basis on both, ``s = mean_n G_n²`` per
        weight. ``None`` is the default, 4096 (not a number in the signature, so that
        ``optax.inject_hyperparams`` leaves it static; a number passed through it must
        be listed in its ``static_args``). 4096 keeps every factor of common
        widths (up to a 4095-wide input with its bias) and bounds a side's cost:
        float32 factor and basis ``8 d²`` bytes (134 MB at 4096, 537 MB at 8192) and
        a float32 ``eigh`` measured at 3.9 s on a 2-core CPU (0.7 s at 2048, 29 s at
        8192; about 30 minutes at a 32768-token vocabulary by the cubic growth).
      stack_blocks: store and compute the blocks of equal shapes and options (the layers of a
        model written as a Python loop, whatever their kind) as one stacked block: one state
        entry, one traced body, one batched projection and one loop of ``eigh`` per distinct
        shape, with equal results (tested in float64). The state then holds one entry per
        group, keyed by its first member's path, its members stacked along a new leading axis
        in the order of ``blocks``; a state of the other layout (a checkpoint) is refused with
        an error that says so. Members whose statistics differ in shape (a strided convolution
        among unstrided ones) are computed apart, their slices of the entry copied out and back.
        Off by default until ``benchmarks/results/depth.md`` shows it faster.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      the keyword-only argument ``stats`` from
      :func:`ekfac_optax.value_grad_and_stats`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dense(3)])
      >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x, y):
      ...     logits = model.apply({"params": params}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> blocks = ek.find_blocks(loss_fn, params, x, y)
      >>> [(path, spec.block) for path, spec in blocks.items()]
      [('layers_0', 'kronecker'), ('layers_1', 'diagonal'), ('layers_2', 'kronecker')]
      >>> tx = optax.chain(
      ...     ek.scale_by_ekfac(blocks=blocks, damping=1e-3), optax.scale_by_learning_rate(0.1)
      ... )
      >>> state = tx.init(params)
      >>> loss, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
      >>> updates, state = tx.update(grads, state, params, stats=stats)

    References:
      George et al., Fast Approximate Natural Gradient Descent in a
      Kronecker-factored Eigenbasis, NeurIPS 2018 (Algorithm 1, Appendix C).
      Eschenhagen et al., Kronecker-Factored Approximate Curvature for Modern
      Neural Network Architectures, NeurIPS 2023 (K-FAC-expand and -reduce).
    """
    rules = {"batch": _scalings.BatchScaling, "running": _scalings.RunningScaling}
    if scaling not in rules:
        raise ValueError(f"scaling must be 'batch' or 'running', got {scaling!r}")
    rule = rules[scaling](scaling_decay=scaling_decay)
    config = _stages.Config(rule, factor_decay, damping_mode, weight_sharing, factor_update_every)
    return _scale_by_kfe(
        blocks,
        damping,
        embedding_damping,
        basis_update_every,
        config,
        fallback,
        mesh,
        max_factor_dim,
        stack_blocks,
    )


def scale_by_kfac(
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    damping: ScalarOrSchedule = 1e-3,
    embedding_damping: ScalarOrSchedule | None = None,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    damping_mode: _scalings.DampingMode = "tikhonov",
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions with KFAC, computed in the same eigenbasis machinery.

    Per Kronecker block, ``(T A ⊗ B + ε I)⁻¹ g`` (``"tikhonov"``) or
    ``((T A + √ε I) ⊗ (B + √ε I))⁻¹ g`` (``"factored"``), i.e. the scalings
    are KFAC's eigenvalues ``T S_A ⊗ S_B`` in the KFE, where ``T`` is the
    number of positions per example (1 for dense layers; the KFC scaling of
    Grosse & Martens for conv layers and shared weights; 1 with
    ``weight_sharing="reduce"``). ``A``, ``B`` and their eigendecomposition
    follow :func:`scale_by_ekfac`; the inverse is refreshed every
    ``basis_update_every`` updates. A normalisation's scale and shift is a
    diagonal block whose ``s`` is the debiased average (decay ``factor_decay``)
    of ``mean_n G_n²``, as kfac-jax's scale-and-shift blocks; the diagonal
    fallback averages ``N g²`` with ``factor_decay``.

    Args:
      blocks: the model's blocks, ``ek.find_blocks(loss_fn, params, *batch)``.
      damping: ``ε``, a float or an optax schedule of the update count.
      embedding_damping: ``ε`` of the embeddings' blocks; see :func:`scale_by_ekfac`.
      basis_update_every: recompute the eigendecomposition every this many updates.
      factor_decay: decay of the moving averages of ``A`` and ``B`` (and of the
        diagonal blocks and fallback), in ``[0, 1)``.
      factor_update_every: see :func:`scale_by_ekfac`.
      damping_mode: ``"tikhonov"``, ``"factored"`` or ``"relative"`` (``ε · mean(s)`` per block);
        see :func:`scale_by_ekfac`.
      weight_sharing: ``"expand"`` or ``"reduce"``; see :func:`scale_by_ekfac`.
      fallback: ``"diagonal"`` or ``"identity"``, for the parameters in no block.
      mesh: devices to spread the eigendecompositions over; see
        :func:`scale_by_ekfac`.
      stack_blocks: see :func:`scale_by_ekfac`.
      max_factor_dim: a factor side above it keeps only its diagonal, ``diag(A)`` or
        ``diag(B)`` in place of ``S_A`` or ``S_B`` (``T diag(A) ⊗ B``); see
        :func:`scale_by_ekfac`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      the keyword-only argument ``stats``.

    References:
      Martens & Grosse, Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature, ICML 2015; Grosse & Martens, A Kronecker-factored
      approximate Fisher matrix for convolution layers, ICML 2016.
    """
    rule = _scalings.KfacScaling(factor_decay=factor_decay)
    config = _stages.Config(rule, factor_decay, damping_mode, weight_sharing, factor_update_every)
    return _scale_by_kfe(
        blocks,
        damping,
        embedding_damping,
        basis_update_every,
        config,
        fallback,
        mesh,
        max_factor_dim,
        stack_blocks,
    )


@_docstrings.inherit_arguments(scale_by_ekfac)
def scale_by_kfe_adam(
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam in the Kronecker-factored eigenbasis (KFE-Adam).

    Per Kronecker block, with ``g̃ = U_Aᵀ g U_B`` in the eigenbasis of the factors
    ``A = E[h_aug h_augᵀ]`` and ``B = E[delta deltaᵀ]`` (as :func:`scale_by_ekfac`
    estimates and refreshes them) and ``k`` the update's number from 1:

    .. math::
      \mu \leftarrow \beta_1 \mu + (1 - \beta_1) g, \quad
      \nu \leftarrow \beta_2 \nu + (1 - \beta_2) \tilde g^2, \quad
      U_A \left[ \frac{U_A^\top \mu U_B / (1 - \beta_1^k)}
      {\sqrt{\nu / (1 - \beta_2^k)} + \epsilon} \right] U_B^\top

    Between basis updates this is exactly ``optax.adam`` on the rotated gradients ``g̃``: the
    paper's proposed future work (Adam/RMSProp in the KFE), and SOAP's update with the KFE of the
    layer's activations and back-propagated gradients in place of Shampoo's gradient
    statistics. At a basis change ``mu`` (kept in the layer's own coordinates) is unchanged and
    ``nu`` keeps what it knows of each new eigenvector: ``nu ← proj^w · prior^(1 - w)`` with
    ``proj = (R_A²)ᵀ nu R_B²`` (``R = U_oldᵀ U_new`` squared elementwise: the diagonal of the
    old second-moment matrix in the new basis), ``w`` each new vector's largest ``R²`` (1 for
    an unchanged vector, so a refresh that finds the same basis changes nothing) and ``prior``
    KFAC's eigenvalues scaled to ``nu``'s sum, at least the squared first moment; so a new
    small-curvature direction does not inherit the old basis's largest moments (see
    ``_scalings.AdamScaling``). An
    embedding's vocabulary side and sides above ``max_factor_dim`` have the identity basis;
    diagonal blocks (norm scales and shifts) and, with ``fallback="diagonal"``, every parameter
    in no block run plain Adam on their coordinates, so the whole model is one optimizer.
    There is no damping: ``eps`` plays its role, as in Adam.

    Args:
      blocks: the model's blocks, ``ek.find_blocks(loss_fn, params, *batch)``.
      b1: decay of the first moment, in ``[0, 1)``.
      b2: decay of the second moment, in ``[0, 1)``.
      eps: ``>= 0``, added to ``√ν̂``.
      {inherited arguments}
      fallback: ``"diagonal"`` (Adam on the parameters in no block) or ``"identity"``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes the keyword-only
      argument ``stats``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dense(3)])
      >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x, y):
      ...     logits = model.apply({"params": params}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> tx = ek.scale_by_kfe_adam(blocks=ek.find_blocks(loss_fn, params, x, y))
      >>> state = tx.init(params)
      >>> loss, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
      >>> updates, state = tx.update(grads, state, params, stats=stats)
      >>> type(state.blocks["layers_0"].scalings).__name__
      'AdamSlot'

    References:
      George et al., Fast Approximate Natural Gradient Descent in a Kronecker-factored
      Eigenbasis, NeurIPS 2018 (conclusion: Adam/RMSProp in the KFE).
      Vyas et al., SOAP: Improving and Stabilizing Shampoo using Adam, ICLR 2025.
      Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015.
    """
    rule = _scalings.AdamScaling(b1=b1, b2=b2, eps=eps)
    config = _stages.Config(rule, factor_decay, "tikhonov", weight_sharing, factor_update_every)
    return _scale_by_kfe(
        blocks, 0.0, None, basis_update_every, config, fallback, mesh, max_factor_dim, stack_blocks
    )
