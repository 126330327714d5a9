"""Diagonal scalings in the Kronecker-factored eigenbasis (KFE) and their damping.

- ``batch_scalings`` (EKFAC, the paper's Algorithm 1): ``s* = mean_n (U_Aᵀ G_n U_B)²``
  from the per-example gradients ``G_n = Σ_t h_aug_{n,t} delta_{n,t}ᵀ``.
- ``running_scalings`` (EKFAC-ra): a moving average of ``N (U_Aᵀ g U_B)²``.
- ``kfac_scalings`` (KFAC): ``T · S_A ⊗ S_B``, the eigenvalues of ``T · A ⊗ B``.
- ``embedding_batch_scalings``: ``batch_scalings`` of an embedding (one-hot inputs, ``U_A = I``);
  ``tied_embedding_batch_scalings``: of an embedding also used through ``attend``.
- ``scale_and_shift_grads``: exact per-example gradients of a normalisation's scale and shift.
- ``damped``: the denominator ``s + damping`` (Tikhonov) or the factored
  damping of Appendix C; ``divide`` applies it.
- The rules (:class:`ScalingRule`): ``KfacScaling``, ``BatchScaling`` (EKFAC),
  ``RunningScaling`` (EKFAC-ra), each a small object with its hyperparameters, its per-block
  slot, its update each step and at a basis change, for Kronecker, embedding and diagonal
  blocks and the fallback. Adding a preconditioner means adding a rule here and its tests.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.curvature._factors import debiased_ema
from ekfac_optax.kinds import _patches


def concrete(name: str, value: Any) -> float | None:
    """A Python, numpy or concrete-array number as a float; None for tracers and schedules."""
    if isinstance(value, jax.core.Tracer) or (callable(value) and name == "damping"):
        return None
    if (
        value is None
        or isinstance(value, (bool, str))
        or not jnp.issubdtype(jnp.result_type(value), jnp.number)
        or jnp.ndim(value) != 0
    ):
        raise TypeError(f"{name} must be a scalar number, got {value!r}")
    return float(value)


DampingMode = Literal["tikhonov", "factored", "relative"]
ScalingName = Literal["batch", "running"]  # scale_by_ekfac's rules by name


def batch_scalings(h_kfe: jax.Array, delta_kfe: jax.Array) -> jax.Array:
    """``s*[i, o] = mean_n (Σ_t h_kfe[n, t, i] delta_kfe[n, t, o])²``.

    Args:
      h_kfe: ``(N, T, a)`` inputs in the eigenbasis, ``h_aug @ U_A``.
      delta_kfe: ``(N, T, b)`` output gradients in the eigenbasis, ``delta @ U_B``.

    Returns:
      ``(a, b)`` second moments of the per-example gradients in the KFE.
      For ``T = 1``: ``(h_kfe²)ᵀ (delta_kfe²) / N``. Otherwise, on CPU, a loop over the
      examples that forms each per-example gradient (``N T a b`` multiply-adds, one ``(a, b)``
      gradient in memory; see ``_per_example_loop``); on GPU/TPU, the per-example gradients as
      one batched product (memory ``N a b``) or, where that is smaller, the position Gramians
      (memory ``N T² (a + b)``, ``N T² a b`` multiply-adds). The Gramians never on CPU: on a
      VGG's 4x4, 512-channel layer at batch 128 (``T = 16``, a capped ``a = 4609``) the input
      Gramian alone is 604 MB, and the contraction takes ``T = 16`` times the loop's
      multiply-adds.
    """
    if h_kfe.ndim != 3 or delta_kfe.ndim != 3 or h_kfe.shape[:2] != delta_kfe.shape[:2]:
        raise ValueError(
            "batch_scalings expects h_kfe (N, T, a) and delta_kfe (N, T, b) with the same N, T; "
            f"got {h_kfe.shape} and {delta_kfe.shape}"
        )
    n, t, a = h_kfe.shape
    b = delta_kfe.shape[-1]
    if t == 1 and a * b > a + b:
        return (h_kfe[:, 0] ** 2).T @ (delta_kfe[:, 0] ** 2) / n
    loop = functools.partial(_per_example_loop, chunks=math.gcd(n, jax.device_count()))
    batched = _per_example_batched if a * b <= t * t * (a + b) else _position_gramians
    return jax.lax.platform_dependent(h_kfe, delta_kfe, cpu=loop, default=batched)


def _position_gramians(h_kfe: jax.Array, delta_kfe: jax.Array) -> jax.Array:
    """``mean_n (h_kfe[n]ᵀ delta_kfe[n])²`` through the position Gramians ``h hᵀ``, ``δ δᵀ``."""
    h_gram = jnp.einsum("nti,nsi->ntsi", h_kfe, h_kfe)
    delta_gram = jnp.einsum("nto,nso->ntso", delta_kfe, delta_kfe)
    return jnp.einsum("ntsi,ntso->io", h_gram, delta_gram) / h_kfe.shape[0]


def rotated_batch_scalings(
    h: jax.Array,
    delta: jax.Array,
    basis_a: jax.Array | None,
    basis_b: jax.Array | None,
    has_bias: bool,
    batched: bool | None = None,
) -> jax.Array:
    """``s* = mean_n (U_Aᵀ G_n U_B)²`` with each per-example gradient ``G_n = Σ_t h_aug δᵀ``
    formed first, then rotated (``None``: that side's basis is the identity).

    :func:`batch_scalings` of the projected ``h_aug U_A`` and ``δ U_B`` costs ``N T (a² + b²)``
    multiply-adds for the projections; forming ``G_n`` first costs ``N T a b`` (the backward's
    weight gradient) and ``N (a² b + a b²)`` for the rotations: far less when the positions ``T``
    outnumber the sides (convolutions: ``T = 1024`` positions at 32x32 against ``a = 577`` for a
    3x3, 64-channel layer, 14x fewer) and the memory is one ``(a, b)`` gradient per example in
    flight instead of the projected ``(N, T, a)`` inputs. One example at a time on CPU
    (``_per_example_loop``'s reasons), batched elsewhere (``batched``: either, on any platform).
    """
    n = h.shape[0]
    a = h.shape[-1] + int(has_bias)
    batched_ = batched

    def per_example(h, delta):
        grad = _outer_sum(_patches.dense(h), delta)
        if has_bias:
            grad = jnp.concatenate([grad, jnp.sum(delta, axis=0)[None]], axis=0)
        if basis_a is not None:
            grad = jax.lax.dot_general(basis_a, grad, (((0,), (0,)), ((), ())))
        return grad if basis_b is None else grad @ basis_b

    def batched(h, delta):  # a convolution's patches a chunk of examples at a time
        def add(total, chunk):
            return total + jnp.sum(jax.vmap(per_example)(*chunk) ** 2, axis=0), None

        zeros = jnp.zeros((a, delta.shape[-1]), delta.dtype)
        return jax.lax.scan(add, zeros, _patches.chunked(h, delta))[0] / n

    def loop(h, delta):
        chunks = math.gcd(n, jax.device_count())
        return _mean_square_loop(per_example, (a, delta.shape[-1]), (h, delta), chunks)

    if batched_ is not None:
        return (batched if batched_ else loop)(h, delta)
    return jax.lax.platform_dependent(h, delta, cpu=loop, default=batched)


def rotate_first_cost(t: int, a: int, b: int, rotate_a: bool, rotate_b: bool) -> tuple[int, int]:
    """Multiply-adds per example of ``s*`` by projecting the inputs and output gradients first
    (:func:`batch_scalings`) and by forming the per-example gradients first
    (:func:`rotated_batch_scalings`), for ``T`` positions and an ``(a, b)`` block whose sides
    ``rotate_a``, ``rotate_b`` have a basis."""
    project = t * (a * a * rotate_a + b * b * rotate_b) + min(t * a * b, t * t * (a + b))
    per_example = t * a * b + a * a * b * rotate_a + a * b * b * rotate_b
    return project, per_example


def _per_example_batched(h_kfe: jax.Array, delta_kfe: jax.Array) -> jax.Array:
    """``mean_n (h_kfe[n]ᵀ delta_kfe[n])²`` from the ``(N, a, b)`` per-example gradients."""
    return jnp.mean(jnp.einsum("nti,nto->nio", h_kfe, delta_kfe) ** 2, axis=0)


def _per_example_loop(h_kfe: jax.Array, delta_kfe: jax.Array, chunks: int) -> jax.Array:
    """``_per_example_batched`` as a ``lax.scan`` over the examples of each of ``chunks`` chunks.

    XLA's CPU backend runs a matrix product with a batch axis far below its
    rate and holds all ``N a b`` per-example values; one example at a time,
    with a single ``(a, b)`` sum, was 2-20x faster for ``a b >= 18k`` in a
    probe (289x64 to 1153x128, ``T`` = 16-256, ``N`` = 128, 2-core EPYC; the
    CNN of ``benchmarks/step_cost.py`` has such layers) and within 30% either
    way on smaller ones. The chunks are ``vmap``-ed (``chunks`` divides ``N``;
    ``batch_scalings`` uses ``gcd(N, device_count)``), so that a batch sharded
    over the devices is looped over on each device, without gathering it.
    """
    shape = (h_kfe.shape[-1], delta_kfe.shape[-1])
    return _mean_square_loop(_outer_sum, shape, (h_kfe, delta_kfe), chunks)


def _outer_sum(h: jax.Array, delta: jax.Array) -> jax.Array:
    """``hᵀ delta`` of one example, contracting the leading axes in place: an explicit transpose
    (``h.T @ ...``) makes it up to 3x slower on CPU."""
    return jax.lax.dot_general(h, delta, (((0,), (0,)), ((), ())))


def _mean_square_loop(per_example, shape, operands, chunks: int) -> jax.Array:
    """``mean_n per_example(*operands[n])²`` (an array of ``shape``) as a ``lax.scan`` over the
    examples of each of ``chunks`` chunks, ``vmap``-ed over the chunks (see
    ``_per_example_loop``)."""
    n = operands[0].shape[0]

    def chunk_sum(*chunk):
        def add(total, example):
            grad = per_example(*example)
            return total + grad * grad, None

        zeros = jnp.zeros(shape, chunk[-1].dtype)
        return jax.lax.scan(add, zeros, chunk)[0]

    if chunks == 1:  # a vmap over one chunk would make each product a slower batched one
        return chunk_sum(*operands) / n

    def split(x):
        return x.reshape(chunks, n // chunks, *x.shape[1:])

    return jnp.sum(jax.vmap(chunk_sum)(*jax.tree.map(split, operands)), axis=0) / n


def embedding_batch_scalings(ids: jax.Array, delta_kfe: jax.Array, vocab: int) -> jax.Array:
    """``s*[v, o] = mean_n (Σ_{t: x_{n,t} = v} delta_kfe[n, t, o])²`` for an embedding.

    With one-hot inputs and ``U_A = I`` the per-example gradient's row ``v`` sums
    the output gradients of the positions holding token ``v``. The sums are taken
    over the distinct ``(example, token)`` pairs (at most ``N T``), so memory is
    ``O((N T + vocab) · d)``, never ``N · vocab · d``.

    Args:
      ids: ``(N, T)`` integer token ids.
      delta_kfe: ``(N, T, b)`` output gradients in the eigenbasis, ``delta @ U_B``.
      vocab: the vocabulary size.

    Returns:
      ``(vocab, b)`` second moments of the per-example gradients in the KFE.
    """
    n, t = ids.shape
    pairs = (jnp.arange(n, dtype=jnp.int32)[:, None] * vocab + ids.astype(jnp.int32)).ravel()
    unique, slot = jnp.unique(pairs, size=n * t, fill_value=-1, return_inverse=True)
    sums = jax.ops.segment_sum(delta_kfe.reshape(n * t, -1), slot.ravel(), num_segments=n * t)
    token = jnp.where(unique >= 0, unique % vocab, vocab)  # fill slots land out of range
    return jax.ops.segment_sum(sums * sums, token, num_segments=vocab) / n


def tied_embedding_batch_scalings(
    ids: jax.Array, delta_kfe: jax.Array, attend_delta: jax.Array, attend_h_kfe: jax.Array
) -> jax.Array:
    """``s* = mean_n (G_n U_B)²`` of a tied embedding (lookup and ``attend``, ``U_A = I``).

    The per-example gradient of the tied ``(vocab, d)`` weight in the eigenbasis is the
    lookups' rows plus the attend calls' outer products:
    ``G_n U_B = Σ_t e_{x_{n,t}} (delta_kfe[n, t])ᵀ + Σ_s g_{n,s} (attend_h_kfe[n, s])ᵀ``. It is
    formed one example at a time (a loop, chunked over the devices), so memory is
    ``O(vocab · d)`` beyond the inputs, never ``N · vocab · d``.

    Args:
      ids: ``(N, T)`` token ids of the lookups (ids outside ``[0, vocab)`` add nothing).
      delta_kfe: ``(N, T, b)`` the lookups' output gradients in the eigenbasis.
      attend_delta: ``(N, S, vocab)`` the attend calls' output gradients ``g``.
      attend_h_kfe: ``(N, S, b)`` the attend calls' inputs in the eigenbasis, ``x @ U_B``.

    Returns:
      ``(vocab, b)`` second moments of the per-example gradients in the KFE.
    """
    vocab = attend_delta.shape[-1]
    ids = jnp.where(ids >= 0, ids, vocab)  # out of range: dropped below, as by the lookup's count

    def per_example(ids, delta, g, x):
        return _outer_sum(g, x).at[ids].add(delta, mode="drop")

    chunks = math.gcd(ids.shape[0], jax.device_count())
    operands = (ids, delta_kfe, attend_delta, attend_h_kfe)
    return _mean_square_loop(per_example, (vocab, delta_kfe.shape[-1]), operands, chunks)


def scale_and_shift_grads(h: jax.Array, delta: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """Per-example gradients ``(N, P)`` of ``[scale; bias]`` for ``y = x̂ · scale + bias``:
    ``Σ_t x̂_{n,t} ⊙ delta_{n,t}`` for ``"scale"`` and ``Σ_t delta_{n,t}`` for ``"bias"``,
    from ``(N, T, F)`` normalised inputs ``h = x̂`` and output gradients ``delta``."""
    parts = {"scale": jnp.einsum("ntf,ntf->nf", h, delta), "bias": jnp.sum(delta, axis=1)}
    return jnp.concatenate([parts[name] for name in names], axis=1)


def running_scalings(scalings: jax.Array, grad_kfe: jax.Array, batch_size: int, decay) -> jax.Array:
    """EKFAC-ra: ``decay · s + (1 - decay) · N · (U_Aᵀ g U_B)²``.

    The squared minibatch gradient ``g = mean_n G_n`` has expectation
    ``E[G_n]² + Var[G_n] / N``; times ``N`` it estimates the per-example second
    moment ``E[G_n²]`` that ``batch_scalings`` computes (exactly when the mean
    gradient is small against its noise), so ``damping`` means the same in both.
    """
    decay = jnp.asarray(decay, scalings.dtype)
    return decay * scalings + (1 - decay) * batch_size * grad_kfe**2


def kfac_scalings(eigvals_a: jax.Array, eigvals_b: jax.Array, positions: int) -> jax.Array:
    """``T · S_A ⊗ S_B`` as an ``(a, b)`` matrix: KFAC's eigenvalues in the KFE.

    ``T`` (positions per example) is the KFC scaling of Grosse & Martens (2016)
    for conv layers and shared weights: ``E[vec(G_n) vec(G_n)ᵀ] ≈ T · A ⊗ B``
    when ``A`` and ``B`` are means over positions.
    """
    return positions * eigvals_a[:, None] * eigvals_b[None, :]


def damped(
    scalings: jax.Array,
    damping,
    eigvals_a: jax.Array,
    eigvals_b: jax.Array,
    positions: int,
    mode: DampingMode,
) -> jax.Array:
    """The denominator of the update in the KFE.

    ``"tikhonov"``: ``s + ε``, i.e. ``(F̂ + ε I)⁻¹`` for the EKFAC/KFAC Fisher ``F̂``.
    ``"factored"`` (the paper's Appendix C): ``s + ε + √ε (T S_A ⊕ S_B)``; for
    KFAC's ``s = T S_A ⊗ S_B`` this is exactly ``((T A + √ε I) ⊗ (B + √ε I))⁻¹``.
    ``"relative"``: ``s + ε · mean(s)`` (:func:`diagonal_damped`).
    """
    damping = jnp.asarray(damping, scalings.dtype)
    if mode in ("tikhonov", "relative"):
        return diagonal_damped(scalings, damping, mode)
    if mode == "factored":
        root = jnp.sqrt(damping)
        return scalings + damping + root * (positions * eigvals_a[:, None] + eigvals_b[None, :])
    raise ValueError(f"damping_mode must be 'tikhonov' or 'factored', got {mode!r}")


def diagonal_damped(scalings: jax.Array, damping, mode: DampingMode) -> jax.Array:
    """The denominator ``s + ε`` of a diagonal block or fallback parameter (``"tikhonov"``,
    ``"factored"``); with ``"relative"``, ``s + ε · mean(s)``: ``ε`` is a fraction of the
    block's (or parameter's) mean scaling, as kronfluence's damping ``0.1 × mean eigenvalue``,
    so that one value fits layers whose curvature differs by orders of magnitude. The mean is
    over the block's own scalings (each member of a stacked block its own); a block whose
    scalings are all zero gets no step."""
    damping = jnp.asarray(damping, scalings.dtype)
    if mode == "relative":
        return scalings + damping * jnp.mean(scalings)
    return scalings + damping


def pinv_cutoff(scalings: jax.Array) -> jax.Array:
    """``max(s) · max(shape) · eps``: scalings at most this are zero up to round-off (as in
    ``numpy.linalg.pinv``)."""
    eps = jnp.finfo(scalings.dtype).eps
    return jnp.max(scalings) * max(scalings.shape, default=1) * eps


def divide(grad_kfe: jax.Array, denominator: jax.Array, damping) -> jax.Array:
    """``grad_kfe / denominator``; with ``damping = 0`` the pseudo-inverse.

    Without damping, the scalings of directions with no curvature are round-off
    rather than zero. As in ``numpy.linalg.pinv``, denominators at most
    ``max(denominator) · max(a, b) · eps`` count as zero, and those directions
    get no step. With ``damping > 0`` every direction is divided exactly.
    """
    tol = jnp.where(jnp.asarray(damping, denominator.dtype) == 0, pinv_cutoff(denominator), 0)
    keep = denominator > tol
    return jnp.where(keep, grad_kfe / jnp.where(keep, denominator, 1), 0)


# --- The scaling rules: one small object per preconditioner ------------------------------------


class Context(NamedTuple):
    """What a rule may read when it updates one block's slot (computed only if asked for).

    Attributes:
      grad_kfe: the incoming update in the KFE, ``U_Aᵀ g U_B`` (a diagonal block: ``g``).
      batch: ``() -> s*``: this batch's per-example second moments in the KFE (a diagonal
        block: of its exact per-example gradients).
      n: the batch size ``N``.
      count: the number of updates applied before this one.
      grad: the incoming update in the block's own coordinates.
      to_kfe: ``M -> U_Aᵀ M U_B`` (a diagonal block: the identity).
    """

    grad_kfe: jax.Array
    batch: Callable[[], jax.Array]
    n: int
    count: jax.Array
    grad: jax.Array
    to_kfe: Callable[[jax.Array], jax.Array]


class BasisChange(NamedTuple):
    """What a rule may read when a block's basis changes (:meth:`ScalingRule.restart`).

    Attributes:
      kfac: KFAC's eigenvalues in the new basis, ``T · S_A ⊗ S_B`` (:func:`kfac_scalings`).
      rotation_a: ``U_oldᵀ U_new`` of the input side (``None``: a side kept diagonal).
      rotation_b: the same of the output side.
      to_kfe: ``M -> U_newᵀ M U_new``, a matrix in the block's coordinates into the new KFE.
      count: the number of updates applied before this one.
    """

    kfac: jax.Array
    rotation_a: jax.Array | None
    rotation_b: jax.Array | None
    to_kfe: Callable[[jax.Array], jax.Array]
    count: jax.Array


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class ScalingRule:
    """How a preconditioner scales the gradient in the KFE: its per-block state slot (by
    default ``s``, the diagonal scalings; zeros at ``init``), its update every step, its rule at
    a basis change, and the same for diagonal blocks and the fallback's parameters. Subclasses
    are the preconditioners; their hyperparameters are checked once, at construction
    (:meth:`check`). The default steps divide by the damped scalings of :meth:`kfe`,
    :meth:`diagonal` and :meth:`fallback`; a rule of another form overrides the steps."""

    name = "rule"
    # The kinds of blocks whose step reads ``Context.batch`` (``s*`` of the batch): what a
    # micro-batch of an accumulated step must measure for this rule (``_microbatch``).
    reads_batch: ClassVar[frozenset[str]] = frozenset()

    def check(self) -> None:
        """Raises ValueError, naming the hyperparameter, for a value out of range."""

    def init(self, shape: tuple[int, ...], dtype) -> Any:
        """The slot of a block (or fallback parameter) of this shape, before any update."""
        return jnp.zeros(shape, dtype)

    def step(self, slot: Any, context: Context, divide: Callable) -> tuple[jax.Array, Any]:
        """``(update in the KFE, new slot)`` of a Kronecker or embedding block; ``divide(s)``
        is ``g̃ / (s + damping)`` with the preconditioner's damping mode."""
        scalings = self.kfe(slot, context)
        return divide(scalings), scalings

    def diagonal_step(self, slot: Any, context: Context, damping, mode: DampingMode):
        """``(update, new slot)`` of a diagonal block: ``g / (s + damping)``
        (:func:`diagonal_damped`)."""
        scalings = self.diagonal(slot, context)
        denominator = diagonal_damped(scalings, damping, mode)
        return divide(context.grad_kfe, denominator, damping), scalings

    def fallback_step(self, slot: Any, grad: jax.Array, n: int, count, damping, mode):
        """``(update, new slot)`` of a parameter in no block: ``g / (s + damping)``."""
        scalings = self.fallback(slot, grad, n, count)
        return divide(grad, diagonal_damped(scalings, damping, mode), damping), scalings

    def may_overflow(self, slot: Any) -> Any:
        """The part of a new slot whose overflow the updates would not show (the guard checks
        it): by default the scalings, whose inf gives a zero update."""
        return slot

    def restart(self, slot: Any, change: BasisChange) -> Any:
        """The slot after a basis change: by default KFAC's eigenvalues in the new basis,
        ``change.kfac`` (the scalings of the old basis mean nothing in the new one)."""
        del slot
        return change.kfac

    def kfe(self, s: jax.Array, context: Context) -> jax.Array:
        """The scalings of a Kronecker or embedding block this step."""
        raise NotImplementedError

    def diagonal(self, s: jax.Array, context: Context) -> jax.Array:
        """The scalings of a diagonal block (exact per-example gradients) this step."""
        raise NotImplementedError

    def fallback(self, s: jax.Array, grad: jax.Array, n: int, count: jax.Array) -> jax.Array:
        """The scalings of a parameter in no block: a debiased average of ``N g²``."""
        return debiased_ema(s, n * grad**2, self.fallback_decay, count)

    @property
    def fallback_decay(self):
        raise NotImplementedError


def _check_decay(name: str, value: Any) -> None:
    number = concrete(name, value)
    if number is not None and not 0 <= number < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


@dataclasses.dataclass(frozen=True)
class KfacScaling(ScalingRule):
    """KFAC: ``s = T S_A ⊗ S_B``, the eigenvalues of ``T A ⊗ B``; a diagonal block and the
    fallback average their second moments with ``factor_decay`` (as kfac-jax's scale-and-shift
    blocks).

    ``s`` changes only with the basis: the slot is set at each basis change (:meth:`restart`)
    and read as it is between them, so that a step neither recomputes nor rewrites an ``(a, b)``
    array (nor has the guard check and select it)."""

    factor_decay: Any = 0.95
    name = "kfac"
    reads_batch = frozenset({"diagonal"})

    def check(self):
        _check_decay("factor_decay", self.factor_decay)

    def kfe(self, s, context):
        return s  # T S_A ⊗ S_B, set by `restart` at the last basis change

    def diagonal(self, s, context):
        return debiased_ema(s, context.batch(), self.factor_decay, context.count)

    @property
    def fallback_decay(self):
        return self.factor_decay


@dataclasses.dataclass(frozen=True)
class _EkfacScaling(ScalingRule):
    """What EKFAC's two rules share: ``scaling_decay``, the fallback's average of ``N g²``."""

    scaling_decay: Any = 0.95

    def check(self):
        _check_decay("scaling_decay", self.scaling_decay)

    @property
    def fallback_decay(self):
        return self.scaling_decay


@dataclasses.dataclass(frozen=True)
class BatchScaling(_EkfacScaling):
    """EKFAC (Algorithm 1): ``s = s*`` of this batch's per-example gradients; the fallback
    averages ``N g²`` with ``scaling_decay``."""

    name = "batch"
    reads_batch = frozenset({"kronecker", "embed", "diagonal"})

    def kfe(self, s, context):
        return context.batch()

    def diagonal(self, s, context):
        return context.batch()


@dataclasses.dataclass(frozen=True)
class RunningScaling(_EkfacScaling):
    """EKFAC-ra: ``s ← d s + (1 - d) N g̃²`` (:func:`running_scalings`), restarted from KFAC's
    eigenvalues at each basis change; a diagonal block and the fallback average ``N g²``."""

    name = "running"

    def kfe(self, s, context):
        return running_scalings(s, context.grad_kfe, context.n, self.scaling_decay)

    def diagonal(self, s, context):
        return debiased_ema(s, context.n * context.grad_kfe**2, self.scaling_decay, context.count)


class AdamSlot(NamedTuple):
    """KFE-Adam's slot of a block: ``mu`` the first moment in the block's own coordinates (a
    vector, rotated exactly into any basis), ``nu`` the second moment in the KFE (the diagonal of
    a matrix in that basis)."""

    mu: jax.Array
    nu: jax.Array


@dataclasses.dataclass(frozen=True)
class AdamScaling(ScalingRule):
    """KFE-Adam: Adam in the Kronecker-factored eigenbasis (the paper's future work; SOAP's
    update in the eigenbasis of the layer's activation and back-propagated-gradient factors).

    Per block, with ``g̃ = U_Aᵀ g U_B`` and ``k`` the update's number (from 1):
    ``mu ← b1 mu + (1 - b1) g`` (in the block's coordinates), ``nu ← b2 nu + (1 - b2) g̃²``
    (in the KFE), and the update ``U_A [m̃ / (√ν̂ + eps)] U_Bᵀ`` with ``m̃ = U_Aᵀ mu U_B /
    (1 - b1^k)`` and ``ν̂ = nu / (1 - b2^k)``. Since ``mu`` is linear in the gradients, ``m̃`` is
    the average of the rotated gradients: between basis changes this is exactly ``optax.adam``
    on ``g̃``. At a basis change ``mu`` needs nothing (it lives in the block's coordinates, as
    SOAP keeps its first moment). ``nu`` keeps what it knows of each new eigenvector and takes the
    rest from the new basis: with ``R = U_oldᵀ U_new`` (squared elementwise) and ``w`` the product
    over the two sides of each new vector's largest ``R²`` (1 for a vector that was already one,
    signs included; about ``1/d`` for one unrelated to all), ``nu_new = proj^w · prior^(1 - w)``
    (elementwise: an interpolation of scales, in log space), where ``proj = (R_A²)ᵀ nu_old R_B²``
    is the diagonal of the old second-moment matrix ``U_old diag(nu_old) U_oldᵀ`` in the new basis
    and ``prior`` is KFAC's eigenvalues scaled to ``nu_old``'s sum, at least the new basis's
    squared first moment (``E[g̃²] >= E[g̃]²``, bias corrections respected). So an unchanged
    basis leaves ``nu`` (and the trajectory) as it was, while a new vector unrelated to the old
    ones (typically of small curvature, where eigenvalues crowd and eigenvectors turn freely
    between refreshes) takes the prior: ``proj`` there averages in the old basis's largest
    moments, many orders of magnitude above the direction's own, and would shrink Adam's steps
    along it for about ``1 / (1 - b2)`` updates (with ``proj`` alone, KFE-Adam on the 28x28
    auto-encoder of ``benchmarks/defaults.py`` stalled from the first refresh on). Diagonal
    blocks and the fallback run plain Adam on their coordinates."""

    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    name = "adam"

    def check(self):
        _check_decay("b1", self.b1)
        _check_decay("b2", self.b2)
        eps = concrete("eps", self.eps)
        if eps is not None and not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def init(self, shape, dtype):
        return AdamSlot(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def _adam(self, slot, grad, grad_rotated, to_rotated, count):
        dtype = grad.dtype
        b1, b2 = jnp.asarray(self.b1, dtype), jnp.asarray(self.b2, dtype)
        k = (count + 1).astype(dtype)
        mu = b1 * slot.mu + (1 - b1) * grad
        nu = b2 * slot.nu + (1 - b2) * grad_rotated**2
        m_hat = to_rotated(mu) / (1 - b1**k)
        nu_hat = nu / (1 - b2**k)
        return m_hat / (jnp.sqrt(nu_hat) + jnp.asarray(self.eps, dtype)), AdamSlot(mu, nu)

    def step(self, slot, context, divide):
        del divide
        return self._adam(slot, context.grad, context.grad_kfe, context.to_kfe, context.count)

    def diagonal_step(self, slot, context, damping, mode):
        del damping, mode
        return self._adam(slot, context.grad, context.grad, _identity, context.count)

    def fallback_step(self, slot, grad, n, count, damping, mode):
        del n, damping, mode
        return self._adam(slot, grad, grad, _identity, count)

    def may_overflow(self, slot):
        # mu is a moving average of the gradients, non-finite only with them (and then the
        # update is); nu's inf (an overflowing g̃²) would give a zero update.
        return slot.nu

    def restart(self, slot, change):
        nu, dtype = slot.nu, slot.nu.dtype
        kept = jnp.ones((), dtype)  # w: how much of each new vector is one of the old ones
        for axis, rotation in ((0, change.rotation_a), (1, change.rotation_b)):
            if rotation is None:
                continue
            squared = (rotation**2).astype(dtype)
            nu = squared.T @ nu if axis == 0 else nu @ squared
            overlap = jnp.clip(jnp.max(squared, axis=0), 0, 1)
            kept = kept * (overlap[:, None] if axis == 0 else overlap[None, :])
        return AdamSlot(slot.mu, self._prior(slot, change) ** (1 - kept) * nu**kept)

    def _prior(self, slot, change):
        """The second moment a new eigenvector gets from the new basis alone, in the stored
        (not bias-corrected) units: KFAC's eigenvalues scaled to the old moments' sum, and
        at least the first moment's square there (``E[g̃²] >= E[g̃]²``)."""
        dtype = slot.nu.dtype
        k = jnp.asarray(change.count, dtype)
        b1, b2 = jnp.asarray(self.b1, dtype), jnp.asarray(self.b2, dtype)
        kfac = change.kfac.astype(dtype)
        total = jnp.sum(kfac)
        shaped = kfac * (jnp.sum(slot.nu) / jnp.where(total > 0, total, 1))
        first = change.to_kfe(slot.mu) / jnp.where(k > 0, 1 - b1**k, 1)
        # At least the smallest normal number: 0 ** (1 - w) is 0 for a w short of 1 by round-off.
        return jnp.maximum(jnp.maximum(shaped, first**2 * (1 - b2**k)), jnp.finfo(dtype).tiny)
