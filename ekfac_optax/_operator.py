"""The preconditioner's curvature as a linear operator on parameter pytrees.

An EKFAC or KFAC state holds, per Kronecker block, the eigenbasis ``U_A ⊗ U_B`` of its factors
and the scalings ``s`` in it, so the block's curvature is
``F̂ = (U_A ⊗ U_B) diag(vec s) (U_A ⊗ U_B)ᵀ``: its products, inverse products with a damping,
log-determinant, trace and diagonal all cost a rotation and an elementwise operation. An
embedding has ``U_A = I``; a side above ``max_factor_dim`` keeps the identity as its basis; a
diagonal block (a normalisation's scale and shift) and the fallback's parameters are their
diagonal ``s``. Every parameter is in one of them (the whole curvature is block diagonal).
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.curvature import _eigenbasis, _scalings
from ekfac_optax.kinds import _blocks, _kinds
from ekfac_optax.update import _stacking, _state, _validation


class BlockCurvature(NamedTuple):
    """One block's curvature ``(U_A ⊗ U_B) diag(vec s) (U_A ⊗ U_B)ᵀ`` on its matrix (a Kronecker
    block's ``[W; b]``, an embedding's table, a diagonal block's ``[scale; bias]``, a fallback
    parameter itself).

    Attributes:
      basis_a: ``(*stack, a, a)`` eigenvectors ``U_A`` (columns); ``None``: the identity.
      basis_b: ``(*stack, b, b)`` eigenvectors ``U_B``; ``None``: the identity.
      scalings: the eigenvalues ``s``, of the block matrix's shape.
    """

    basis_a: jax.Array | None
    basis_b: jax.Array | None
    scalings: jax.Array


def _rotated(fn, spec: _blocks.BlockSpec | None):
    """``fn(block, matrix)`` of one member, mapped over a stacked block's leading axes (a
    block without bases, elementwise, needs no map)."""

    def apply(block: BlockCurvature, *args):
        if block.basis_a is None and block.basis_b is None:
            return fn(block, *args)
        return _blocks.vmapped(fn, spec.stack)(block, *args)

    return apply


def _in_basis(block: BlockCurvature, matrix: jax.Array, elementwise) -> jax.Array:
    """``U_A [elementwise(U_Aᵀ M U_B)] U_Bᵀ`` of one member."""
    rotated = _eigenbasis.to_eigenbasis(matrix, block.basis_a, block.basis_b)
    return _eigenbasis.from_eigenbasis(elementwise(rotated), block.basis_a, block.basis_b)


def _member_diagonal(block: BlockCurvature) -> jax.Array:
    """The diagonal of one member's ``F̂``: ``(U_A∘U_A) s (U_B∘U_B)ᵀ``."""
    diagonal = block.scalings
    if block.basis_a is not None:
        diagonal = block.basis_a**2 @ diagonal
    return diagonal if block.basis_b is None else diagonal @ (block.basis_b**2).T


def _check_damping(damping: Any, where: str) -> None:
    value = _scalings.concrete("damping", damping)
    if value is not None and not value >= 0:
        raise ValueError(f"Curvature.{where}: damping must be >= 0, got {damping!r}")


@jax.tree_util.register_pytree_node_class
class Curvature:
    """The curvature ``F̂`` of an EKFAC, EKFAC-ra or KFAC state as a linear operator on
    parameter pytrees (made by :func:`curvature`).

    Per Kronecker block ``F̂ = (U_A ⊗ U_B) diag(vec s) (U_A ⊗ U_B)ᵀ`` with the state's eigenbases and
    scalings ``s`` (KFAC: ``T S_A ⊗ S_B``, so ``F̂ = T A ⊗ B`` at the last basis update; EKFAC:
    ``s*`` of the last batch; EKFAC-ra: the running ``s``), an embedding's with ``U_A = I``, a
    diagonal block's and each fallback parameter's ``diag(s)``. As the state, the operator is a
    pytree of arrays: pass it to jitted functions, ``jax.vmap`` its methods over vectors.

    Attributes:
      blocks: per layer (module path), its :class:`BlockCurvature`.
      fallback: per parameter in no block (``/``-joined path), its :class:`BlockCurvature` (no
        bases, ``s`` of the parameter's shape).
    """

    def __init__(self, blocks, fallback, specs, template):
        self.blocks = blocks
        self.fallback = fallback
        self._specs = specs  # ((path, BlockSpec), ...) in the curvature dtype
        self._template = template  # (treedef, leaves as jax.ShapeDtypeStruct)

    def tree_flatten(self):
        return (self.blocks, self.fallback), (self._specs, self._template)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def _with_fallback(self, scalings: Mapping[str, jax.Array]) -> "Curvature":
        """This curvature with the fallback parameters' diagonals replaced by ``scalings``."""
        fallback = {
            path: BlockCurvature(None, None, scalings[path].astype(block.scalings.dtype))
            for path, block in self.fallback.items()
        }
        return Curvature(self.blocks, fallback, self._specs, self._template)

    # --- Parameter pytrees and block matrices --------------------------------------------------

    def _check_vector(self, v: Any, where: str) -> Any:
        v = _blocks.as_arrays(v)
        treedef, leaves = self._template
        if jax.tree.structure(v) != treedef:
            raise ValueError(
                f"Curvature.{where}: the vector's structure differs from the parameters': "
                f"expected {treedef}, got {jax.tree.structure(v)}"
            )
        for (key_path, leaf), like in zip(
            jax.tree_util.tree_leaves_with_path(v), leaves, strict=True
        ):
            if tuple(jnp.shape(leaf)) != like.shape:
                raise ValueError(
                    f"Curvature.{where}: the vector's {_blocks.path_key(key_path)!r} has shape "
                    f"{tuple(jnp.shape(leaf))}, the parameter's is {like.shape} (to apply it to "
                    "several vectors, jax.vmap the method)"
                )
        return v

    def _map(self, v: Any, fn, where: str) -> Any:
        """``v`` with each block's matrix ``M`` replaced by ``fn(spec, block, M)``."""
        v = self._check_vector(v, where)
        layers = {}
        for path, spec in self._specs:
            node = _blocks.subtree(v, path)
            result = fn(spec, self.blocks[path], _kinds.to_matrix(node, spec))
            layers[path] = _kinds.from_matrix(result, node, spec)
        out = _blocks.replace_blocks(v, layers)

        def leaf(key_path, x):
            path = _blocks.path_key(key_path)
            if path not in self.fallback:
                return x
            block = self.fallback[path]
            return fn(None, block, x.astype(block.scalings.dtype)).astype(x.dtype)

        return jax.tree_util.tree_map_with_path(leaf, out)

    def _all(self):
        """``(spec, block)`` of every block and fallback parameter (``spec=None``)."""
        yield from ((spec, self.blocks[path]) for path, spec in self._specs)
        yield from ((None, block) for block in self.fallback.values())

    def _total(self, fn) -> jax.Array:
        """``Σ fn(s)`` over every block's scalings, in at least float32."""
        parts = [fn(block.scalings) for _, block in self._all()]
        dtype = jnp.result_type(jnp.float32, *parts) if parts else jnp.float32
        return sum((jnp.sum(p, dtype=dtype) for p in parts), jnp.zeros((), dtype))

    # --- The operator ----------------------------------------------------------------------------

    def matvec(self, v: Any) -> Any:
        """``F̂ v``: per block ``U_A [s ∘ (U_Aᵀ V U_B)] U_Bᵀ``; a pytree like ``v``."""

        def one(spec, block, matrix):
            return _rotated(lambda b, m: _in_basis(b, m, lambda r: b.scalings * r), spec)(
                block, matrix
            )

        return self._map(v, one, "matvec")

    def solve(self, v: Any, damping: jax.typing.ArrayLike) -> Any:
        """``(F̂ + λI)⁻¹ v`` with ``λ = damping``: per block ``U_A [(U_Aᵀ V U_B) / (s + λ)] U_Bᵀ``.

        ``damping = 0`` inverts ``F̂`` itself, which must then be non-singular: directions with
        ``s = 0`` give ``inf`` or ``nan`` (checked, with a ``ValueError``, where the scalings
        are not traced)."""
        _check_damping(damping, "solve")
        self._check_regular(damping, "solve")

        def one(spec, block, matrix):
            def divide(b, m):
                return _in_basis(b, m, lambda r: r / (b.scalings + damping))

            return _rotated(divide, spec)(block, matrix)

        return self._map(v, one, "solve")

    def logdet(self, damping: jax.typing.ArrayLike) -> jax.Array:
        """``log det(F̂ + λI) = Σ log(s + λ)`` over every block, a ``()`` array."""
        _check_damping(damping, "logdet")
        self._check_regular(damping, "logdet")
        return self._total(lambda s: jnp.log(s + damping))

    def trace(self) -> jax.Array:
        """``tr F̂ = Σ s`` over every block, a ``()`` array."""
        return self._total(lambda s: s)

    def diagonal(self) -> Any:
        """The diagonal of ``F̂`` as a parameter pytree: per block ``(U_A∘U_A) s (U_B∘U_B)ᵀ``."""
        treedef, leaves = self._template
        zeros = jax.tree.unflatten(treedef, [jnp.zeros(x.shape, x.dtype) for x in leaves])

        def one(spec, block, matrix):
            del matrix
            return _rotated(_member_diagonal, spec)(block)

        return self._map(zeros, one, "diagonal")

    def _check_regular(self, damping: Any, where: str) -> None:
        """With ``damping = 0``: a ValueError naming a block with a zero scaling (when the
        scalings are concrete). As in ``numpy.linalg.pinv``, a scaling at most ``max(s) ·
        max(shape) · eps`` is zero: the round-off of a direction with no curvature."""
        if _scalings.concrete("damping", damping) != 0:
            return
        named = [(path, self.blocks[path]) for path, _ in self._specs]
        named += list(self.fallback.items())
        for path, block in named:
            s = block.scalings
            if isinstance(s, jax.core.Tracer):
                return
            smallest = float(jnp.min(s))
            if not smallest > float(_scalings.pinv_cutoff(s)):
                raise ValueError(
                    f"Curvature.{where}: with damping=0 the curvature must be regular, but it is "
                    f"singular on {path or '<root>'!r} (smallest scaling {smallest:.3g}, largest "
                    f"{float(jnp.max(s)):.3g}); pass damping > 0"
                )


def _find_state(opt_state: Any) -> _state.ScaleByEkfacState:
    """The one :class:`ScaleByEkfacState` in an optimizer's state, or an error."""
    found = _state.find_states(opt_state)
    if len(found) != 1:
        raise (TypeError if not found else ValueError)(
            f"curvature: opt_state holds {len(found)} states of ekfac_optax's preconditioners "
            "(ScaleByEkfacState), expected one: pass the state of the one to read"
        )
    return found[0]


def curvature(
    opt_state: Any,
    params: Any,
    blocks: Mapping[str, _blocks.BlockSpec],
    max_factor_dim: int | None = None,
) -> Curvature:
    r"""The curvature ``F̂`` that an EKFAC, EKFAC-ra or KFAC state holds, as a linear operator.

    Per Kronecker block, with the state's eigenbasis ``U_A ⊗ U_B`` and scalings ``s``:

    .. math::
      \hat F = (U_A \otimes U_B)\, \mathrm{diag}(\mathrm{vec}\, s)\,
      (U_A \otimes U_B)^\top

    (KFAC's ``s = T S_A ⊗ S_B`` makes it ``T A ⊗ B``); embeddings have ``U_A = I``, diagonal
    blocks and the fallback's parameters ``diag(s)``. :class:`Curvature`'s ``matvec``,
    ``solve``, ``logdet``, ``trace`` and ``diagonal`` work on pytrees of the parameters'
    structure.

    Args:
      opt_state: the state of :func:`scale_by_ekfac` or :func:`scale_by_kfac` (or of a chain,
        ``multi_steps``, ... holding exactly one of them), after at least one update.
      params: the parameters (their structure and shapes; an NNX model's ``nnx.Param`` state).
      blocks: the blocks given to the preconditioner (``stack_blocks=True`` states too).
      max_factor_dim: the preconditioner's ``max_factor_dim`` (``None``: its default).

    Returns:
      A :class:`Curvature`, a pytree (pass it to jitted functions).

    Raises:
      TypeError: no preconditioner state in ``opt_state``.
      ValueError: a KFE-Adam state (Adam's moments are no curvature estimate), a state before
        its first update (no eigenbasis yet), a state of other blocks or parameters, or one
        with parameters and no curvature (``fallback="identity"``).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Dense(2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.5]])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x):
      ...     return jnp.mean(model.apply({"params": params}, x) ** 2)
      >>> blocks = ek.find_blocks(loss_fn, params, x)
      >>> tx = ek.scale_by_kfac(blocks=blocks)
      >>> _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x)
      >>> _, state = tx.update(grads, tx.init(params), stats=stats)
      >>> op = ek.curvature(state, params, blocks)
      >>> v = jax.tree.map(jnp.ones_like, params)
      >>> w = op.solve(op.matvec(v), damping=0.0)  # F̂ is regular here: back to v
      >>> bool(jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, b, atol=1e-4), w, v)))
      True
      >>> a, b = state.blocks[""].factor_a, state.blocks[""].factor_b  # the layer at the root
      >>> round(float(op.trace()), 4), round(float(jnp.trace(a) * jnp.trace(b)), 4)  # tr(A ⊗ B)
      (9.6342, 9.6342)
    """
    state = _find_state(opt_state)
    params = _blocks.as_arrays(params)
    blocks = _blocks.with_cap(_blocks.checked(blocks, "curvature", params), max_factor_dim)
    stacked = _stacking.plan(blocks, enabled=True)
    stored = _stacking.plan(blocks, enabled=set(state.blocks) == set(stacked))
    specs = _validation.check_update(
        params, state, blocks, stored, where="curvature", tree="curvature: params"
    )
    layers = _stacking.unstack(stored, state.blocks)
    slots = [layers[path].scalings for path in specs] + list(state.fallback.values())
    if any(isinstance(slot, _scalings.AdamSlot) for slot in slots):
        raise ValueError(
            "curvature: a KFE-Adam state holds Adam's moments of the minibatch gradients, not a "
            "curvature estimate; read the state of ek.ekfac / ek.kfac, or fit one"
        )
    count = state.count
    if not isinstance(count, jax.core.Tracer) and int(count) == 0:
        raise ValueError(
            "curvature: the state has no eigenbasis yet (count 0: straight from init); apply at "
            "least one update first"
        )
    outside = _blocks.fallback_leaves(params, blocks)
    if outside and not state.fallback:
        raise ValueError(
            f"curvature: the parameters {sorted(outside)[:5]} are in no block and the state has "
            "no curvature for them (fallback='identity'); use fallback='diagonal'"
        )

    def of(path: str, spec: _blocks.BlockSpec) -> BlockCurvature:
        entry = layers[path]
        return BlockCurvature(
            getattr(entry, "basis_a", None), getattr(entry, "basis_b", None), entry.scalings
        )

    leaves, treedef = jax.tree.flatten(params)
    template = (
        treedef,
        tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves),
    )
    return Curvature(
        blocks={path: of(path, spec) for path, spec in specs.items()},
        fallback={path: BlockCurvature(None, None, s) for path, s in state.fallback.items()},
        specs=tuple(specs.items()),
        template=template,
    )
