"""The layer-kind table: which Flax modules get which curvature block, and how.

Each entry of ``KINDS`` is one kind of layer. It says how a module call is
recognised (its class and method), what its :class:`BlockSpec` is (from the
module's attributes, its input and its parameters), how the call's input
becomes ``h`` and its output gradient ``delta`` (both ``(*stack, N, T, d)``:
examples, positions, features), and how its parameters map to the block's
matrix and back. The block types:

- ``"kronecker"``: a ``(d_in + 1, d_out)`` matrix ``[W; b]`` (no bias row
  without a bias) with factors ``A = E[h_aug h_augᵀ]``, ``B = E[delta deltaᵀ]``;
  a leading ``stack`` axis holds independent blocks of equal shape (the groups
  of a grouped convolution, the ``batch_dims`` of a ``DenseGeneral``).
- ``"embed"``: a ``(vocab, d)`` embedding table, a Kronecker block whose input
  is one-hot, so ``A = diag(token counts) / (N T)`` is stored as a vector.
- ``"diagonal"``: the scale and shift of a normalisation layer,
  ``[scale.ravel(); bias.ravel()]``, with exact per-example gradients
  ``Σ_t [x̂ ⊙ delta; delta]`` from the normalised input ``x̂``.

Every parameter in no block gets the fallback of the preconditioner. Adding a
kind means adding an entry here and its tests. Layer keys are the
``/``-joined Flax module paths.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from ekfac_optax.kinds import _patches
from ekfac_optax.kinds._blocks import BlockSpec, BlockType, curvature_dtype, vmapped

KERNEL = "kernel"
BIAS = "bias"
EMBEDDING = "embedding"
SCALE = "scale"


def is_nnx(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX module."""
    return isinstance(x, nnx.Module)


def params_of(module: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The module's own parameters (of ``names``, or all) as arrays: a linen module's
    ``"params"`` collection, an NNX module's ``nnx.Param`` attributes."""
    if isinstance(module, nnx.Module):
        names = names if names is not None else sorted(vars(module))
        return {
            name: getattr(module, name).get_value()
            for name in names
            if isinstance(getattr(module, name, None), nnx.Param)
        }
    params = module.variables.get("params", {})
    names = names if names is not None else sorted(params)
    return {name: params[name] for name in names if name in params}


def _spec(path, kind, block, params, *, stack=(), d_in, d_out, layout=None) -> BlockSpec:
    names = tuple(params)
    return BlockSpec(
        path=path,
        kind=kind,
        block=block,
        params=tuple((name, tuple(jnp.shape(params[name]))) for name in names),
        stack=tuple(stack),
        d_in=int(d_in),
        d_out=int(d_out),
        has_bias=BIAS in params,
        dtype=curvature_dtype(jnp.result_type(*params.values())),
        layout=layout,
    )


def _need_batch_axis(path: str, x: Any, ndim: int, what: str) -> None:
    if jnp.ndim(x) < ndim:
        raise ValueError(
            f"value_grad_and_stats: layer {path!r} was called on an input of shape "
            f"{jnp.shape(x)}; captured layers need a leading batch axis ({what}: at least "
            f"{ndim} axes)"
        )


class _Kind:
    """The interface of a kind; see the module docstring."""

    name: str
    block: BlockType
    modules: tuple[type, ...] = ()  # linen and NNX classes
    method: str = "__call__"

    def matches(self, module: Any, method: str) -> bool:
        return method == self.method and isinstance(module, self.modules)

    def spec(self, path: str, module: nn.Module, x: Any) -> BlockSpec | str:
        """The block of a call, or the reason why its parameters fall back."""
        raise NotImplementedError

    def call_spec(self, path: str, module: nn.Module, args, kwargs) -> BlockSpec | str:
        """:meth:`spec` of a call's arguments (a kind whose block depends on more than the
        input overrides this)."""
        return self.spec(path, module, first_input(args, kwargs))

    def inputs(self, spec: BlockSpec, module: nn.Module, args, kwargs) -> jax.Array:
        """``h``: ``(*stack, N, T, d_in)`` (embed: ``(N, T)`` token ids)."""
        raise NotImplementedError

    def probe(self, h: Any) -> jax.Array:
        """The array that the capture taps for :meth:`inputs`' ``h`` (its cotangent)."""
        return h

    def from_probe(self, spec: BlockSpec, probe: jax.Array) -> Any:
        """Inverse of :meth:`probe`, for the probe's gradient (lifted axes included)."""
        return probe

    def outputs(self, spec: BlockSpec, grad: jax.Array) -> jax.Array:
        """``delta``: the output gradient ``(*stack, N, T, d_out)``."""
        return grad.reshape(grad.shape[0], -1, spec.d_out)

    def weights(self, spec: BlockSpec, node: Mapping[str, jax.Array]) -> jax.Array:
        """The kernel as ``(*stack, d_in, d_out)``."""
        return jnp.reshape(node[KERNEL], (*spec.stack, spec.d_in, spec.d_out))

    def kernel_like(self, spec: BlockSpec, matrix: jax.Array, like: jax.Array) -> jax.Array:
        """Inverse of :meth:`weights`."""
        return jnp.reshape(matrix, like.shape)

    def bias_row(self, spec: BlockSpec, bias: jax.Array) -> jax.Array:
        """The bias as the block matrix's last row, ``(*stack, 1, d_out)``."""
        return jnp.reshape(bias, (*spec.stack, 1, spec.d_out))

    def bias_like(self, spec: BlockSpec, row: jax.Array, like: jax.Array) -> jax.Array:
        """Inverse of :meth:`bias_row`, from the ``(*stack, d_out)`` row."""
        return jnp.reshape(row, like.shape)


def first_input(args, kwargs) -> Any:
    return args[0] if args else kwargs["inputs"]


class _Dense(_Kind):
    name, block, modules = "dense", "kronecker", (nn.Dense, nnx.Linear)

    def spec(self, path, module, x):
        _need_batch_axis(path, x, 2, "(batch, ..., features)")
        params = params_of(module, (KERNEL, BIAS))
        kernel = params[KERNEL]
        return _spec(
            path, self.name, self.block, params, d_in=kernel.shape[0], d_out=kernel.shape[1]
        )

    def inputs(self, spec, module, args, kwargs):
        x = first_input(args, kwargs)
        return x.reshape(x.shape[0], -1, spec.d_in)


def _axes(axes: Any, ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


class _DenseGeneral(_Kind):
    """``nn.DenseGeneral``: the contracted axes are the fan-in, the features the fan-out, the
    ``batch_dims`` (leading, consecutive) index a stack of blocks, the axis after them holds the
    examples and the others are positions. ``layout`` is ``(batch_dims, axis)`` with ``axis``
    counted from the end, so that calls on inputs of other ranks share the block."""

    name, block, modules = "dense_general", "kronecker", (nn.DenseGeneral, nnx.LinearGeneral)

    def spec(self, path, module, x):
        ndim = jnp.ndim(x)
        batch_dims = (
            tuple(module.batch_axis) if isinstance(module, nnx.Module) else module.batch_dims
        )
        batch_dims = _axes(batch_dims, ndim) if batch_dims else ()
        _need_batch_axis(path, x, len(batch_dims) + 2, "(batch_dims..., batch, ..., features)")
        axis = _axes(module.axis, ndim)
        if len(batch_dims) in axis:
            return f"DenseGeneral contracts axis {len(batch_dims)}, its example axis"
        params = params_of(module, (KERNEL, BIAS))
        shape = jnp.shape(x)
        return _spec(
            path,
            self.name,
            self.block,
            params,
            stack=(math.prod(shape[a] for a in batch_dims),) if batch_dims else (),
            d_in=math.prod(shape[a] for a in axis),
            d_out=math.prod(jnp.shape(params[KERNEL])[len(batch_dims) + len(axis) :]),
            layout=(batch_dims, tuple(a - ndim for a in axis)),
        )

    def inputs(self, spec, module, args, kwargs):
        x = first_input(args, kwargs)
        batch_dims, axis = spec.layout
        axis = tuple(a % x.ndim for a in axis)
        x = jnp.moveaxis(x, axis, range(x.ndim - len(axis), x.ndim))
        return x.reshape(*spec.stack, x.shape[len(batch_dims)], -1, spec.d_in)

    def outputs(self, spec, grad):
        lead = len(spec.layout[0])
        return grad.reshape(*spec.stack, grad.shape[lead], -1, spec.d_out)


class _Conv(_Kind):
    """``nn.Conv`` with ``feature_group_count = G``: ``G`` blocks (stacked when ``G > 1``) of the
    SUA patches of each group's input channels; ``layout`` is ``(geometry, G)``."""

    name, block, modules = "conv", "kronecker", (nn.Conv, nnx.Conv)

    def geometry(self, module):
        return _patches.conv_geometry(module)

    def spec(self, path, module, x):
        geometry = self.geometry(module)
        rank = len(geometry.kernel_size)
        _need_batch_axis(path, x, rank + 2, "(batch, spatial..., channels)")
        if module.mask is not None:
            return f"{type(module).__name__} with a mask"
        groups = getattr(module, "feature_group_count", 1)
        params = params_of(module, (KERNEL, BIAS))
        kernel_shape = jnp.shape(params[KERNEL])
        d_out = kernel_shape[-1] // groups
        return _spec(
            path,
            self.name,
            self.block,
            params,
            stack=(groups,) if groups > 1 else (),
            d_in=math.prod(kernel_shape[:-1]),
            d_out=d_out,
            layout=(geometry, groups),
        )

    def inputs(self, spec, module, args, kwargs):
        """The patches as :class:`~ekfac_optax.kinds._patches.Patches` of the padded input (the
        groups' channels on a leading axis): never materialised whole."""
        x = first_input(args, kwargs)
        geometry, groups = spec.layout[:2]
        extra = x.ndim - len(geometry.kernel_size) - 2  # more batch axes: positions
        if groups > 1:  # each group's channels, offset-major and channel-minor in its patches
            x = jnp.moveaxis(x.reshape(*x.shape[:-1], groups, -1), -2, 0)
        return _patches.Patches(_patches.pad(geometry, x), geometry, extra)

    def probe(self, h):
        return h.padded

    def from_probe(self, spec, probe):
        geometry = spec.layout[0]
        extra = probe.ndim - len(spec.stack) - len(geometry.kernel_size) - 2
        return _patches.Patches(probe, geometry, extra)

    def outputs(self, spec, grad):
        groups = spec.layout[1]
        if groups == 1:
            return grad.reshape(grad.shape[0], -1, spec.d_out)
        return jnp.moveaxis(grad.reshape(grad.shape[0], -1, groups, spec.d_out), 2, 0)

    def weights(self, spec, node):
        kernel = node[KERNEL]
        groups = spec.layout[1]
        if groups == 1:
            return jnp.reshape(kernel, (spec.d_in, spec.d_out))
        matrix = jnp.reshape(kernel, (spec.d_in, groups, spec.d_out))
        return jnp.moveaxis(matrix, 1, 0)

    def kernel_like(self, spec, matrix, like):
        if spec.layout[1] > 1:
            matrix = jnp.moveaxis(matrix, 0, 1)
        return jnp.reshape(matrix, like.shape)


class _ConvTranspose(_Conv):
    """``nn.ConvTranspose``: the convolution with unit strides of the input dilated by the
    strides that ``lax.conv_transpose`` runs. With ``transpose_kernel`` the kernel is used
    flipped in space with its channel axes swapped; the block matrix is that of the kernel
    actually applied."""

    name, block, modules = "conv_transpose", "kronecker", (nn.ConvTranspose, nnx.ConvTranspose)

    def geometry(self, module):
        return _patches.conv_transpose_geometry(module)

    def spec(self, path, module, x):
        padding = module.padding
        if isinstance(padding, str) and padding.upper() == "CIRCULAR":
            return "ConvTranspose with CIRCULAR padding (its output is wrapped after the product)"
        spec = super().spec(path, module, x)
        if isinstance(spec, str):
            return spec
        kernel_shape = dict(spec.params)[KERNEL]
        c_in, c_out = kernel_shape[-2:][:: -1 if module.transpose_kernel else 1]
        return dataclasses.replace(
            spec,
            d_in=math.prod(kernel_shape[:-2]) * c_in,
            d_out=c_out,
            layout=(*spec.layout, bool(module.transpose_kernel)),
        )

    def _applied(self, kernel, transpose_kernel):
        if not transpose_kernel:
            return kernel
        spatial = tuple(range(kernel.ndim - 2))
        return jnp.swapaxes(jnp.flip(kernel, spatial), -1, -2)

    def weights(self, spec, node):
        applied = self._applied(node[KERNEL], spec.layout[2])
        return jnp.reshape(applied, (spec.d_in, spec.d_out))

    def kernel_like(self, spec, matrix, like):
        shape = like.shape[:-2] + like.shape[-2:][:: -1 if spec.layout[2] else 1]
        return self._applied(jnp.reshape(matrix, shape), spec.layout[2])


class _Einsum(_Kind):
    """``nn.Einsum`` / ``nnx.Einsum`` whose equation is a linear map of its input: each kernel
    letter is contracted with the input (the fan-in), kept in the output only (the fan-out) or
    in both (a stack of blocks, as ``DenseGeneral``'s ``batch_dims``, e.g. the experts of
    ``"ebd,edf->ebf"``); the input's first letter outside the kernel is the example axis and
    its other letters outside the kernel are positions. ``layout`` is
    ``(input, kernel, output, stack, fan-in, fan-out, positions)`` letters (positions start with
    the example's); the bias, over the output's kernel letters, is a row per stack member."""

    name, block, modules = "einsum", "kronecker", (nn.Einsum, nnx.Einsum)

    def call_spec(self, path, module, args, kwargs):
        x = first_input(args, kwargs)
        equation = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        equation = (equation or module.einsum_str).replace(" ", "")
        layout = _einsum_layout(equation)
        if isinstance(layout, str):
            return f"Einsum {equation!r}: {layout}"
        inputs, kernel, _, stack, fan_in, fan_out, _ = layout
        _need_batch_axis(path, x, len(inputs), f"the einsum's input {inputs!r}")
        params = params_of(module, (KERNEL, BIAS))
        sizes = dict(zip(kernel, jnp.shape(params[KERNEL]), strict=True))
        return _spec(
            path,
            self.name,
            self.block,
            params,
            stack=(math.prod(sizes[c] for c in stack),) if stack else (),
            d_in=math.prod(sizes[c] for c in fan_in),
            d_out=math.prod(sizes[c] for c in fan_out),
            layout=layout,
        )

    def _rows(self, spec, x, letters, features):
        """``x`` (of ``letters``) as ``(*stack, N, T, features' size)``."""
        stack, positions = spec.layout[3], spec.layout[6]
        order = [letters.index(c) for c in (*stack, *positions, *features)]
        x = jnp.transpose(x, order)
        n = x.shape[len(stack)]
        return x.reshape(*spec.stack, n, -1, math.prod(x.shape[len(stack) + len(positions) :]))

    def inputs(self, spec, module, args, kwargs):
        return self._rows(spec, first_input(args, kwargs), spec.layout[0], spec.layout[4])

    def outputs(self, spec, grad):
        return self._rows(spec, grad, spec.layout[2], spec.layout[5])

    def _kernel_order(self, spec):
        kernel, _, stack, fan_in, fan_out = spec.layout[1:6]
        return kernel, (*stack, *fan_in, *fan_out)

    def weights(self, spec, node):
        kernel, order = self._kernel_order(spec)
        matrix = jnp.transpose(node[KERNEL], [kernel.index(c) for c in order])
        return jnp.reshape(matrix, (*spec.stack, spec.d_in, spec.d_out))

    def kernel_like(self, spec, matrix, like):
        kernel, order = self._kernel_order(spec)
        sizes = dict(zip(kernel, like.shape, strict=True))
        matrix = jnp.reshape(matrix, [sizes[c] for c in order])
        return jnp.transpose(matrix, [order.index(c) for c in kernel])

    def _bias_letters(self, spec):
        kernel, output, stack, _, fan_out = spec.layout[1:6]
        return tuple(c for c in output if c in kernel), (*stack, *fan_out)

    def bias_row(self, spec, bias):
        letters, order = self._bias_letters(spec)
        row = jnp.transpose(bias, [letters.index(c) for c in order])
        return jnp.reshape(row, (*spec.stack, 1, spec.d_out))

    def bias_like(self, spec, row, like):
        letters, order = self._bias_letters(spec)
        sizes = dict(zip(letters, like.shape, strict=True))
        row = jnp.reshape(row, [sizes[c] for c in order])
        return jnp.transpose(row, [order.index(c) for c in letters])


def _einsum_layout(equation: str) -> tuple | str:
    """The letters of :class:`_Einsum`'s ``layout`` for ``"input,kernel->output"``, or why the
    equation is no linear map of the input that one Kronecker block (or a stack) describes."""
    if "..." in equation:
        return "an ellipsis (name every axis to get a block)"
    lhs, output = equation.split("->")
    inputs, kernel = lhs.split(",")
    for name, letters in (("input", inputs), ("kernel", kernel), ("output", output)):
        if len(set(letters)) < len(letters):
            return f"a letter repeated in the {name} (a diagonal)"
    if all(c in kernel for c in inputs):
        return "every input axis is contracted or stacked with the kernel (no example axis)"
    summed = [c for c in kernel if c not in inputs and c not in output]
    if summed:
        return f"kernel axes {''.join(summed)!r} summed out of the product"
    dropped = [c for c in inputs if c not in kernel and c not in output]
    if dropped:
        return f"input axes {''.join(dropped)!r} summed without the kernel"
    stack = tuple(c for c in kernel if c in inputs and c in output)
    fan_in = tuple(c for c in kernel if c in inputs and c not in output)
    fan_out = tuple(c for c in kernel if c not in inputs)
    positions = tuple(c for c in inputs if c not in kernel)
    return (inputs, kernel, output, stack, fan_in, fan_out, positions)


class _Embed(_Kind):
    """``nn.Embed`` called on integer ids: ``h`` are the ids, ``(N, T)``."""

    name, block, modules = "embed", "embed", (nn.Embed, nnx.Embed)

    def spec(self, path, module, x):
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"value_grad_and_stats: nn.Embed {path!r} expects integer token ids of shape "
                f"(batch, ...), got {dtype} of shape {jnp.shape(x)}"
            )
        _need_batch_axis(path, x, 1, "(batch, ...) token ids")
        params = params_of(module, (EMBEDDING,))
        vocab, features = jnp.shape(params[EMBEDDING])
        return _spec(path, self.name, self.block, params, d_in=vocab, d_out=features)

    def inputs(self, spec, module, args, kwargs):
        x = first_input(args, kwargs)
        return x.reshape(x.shape[0], -1).astype(jnp.int32)

    def weights(self, spec, node):
        return node[EMBEDDING]


class _EmbedAttend(_Embed):
    """``nn.Embed.attend`` (a tied output layer, ``logits = x Eᵀ``): ``h`` is the input ``x``,
    ``(N, S, d)``, its output gradient ``(N, S, vocab)``. The call's spec has ``layout``
    ``"attend"``; the calls of a path through ``__call__`` and ``attend`` make one tied
    embedding block (:func:`tied`)."""

    name, method = "embed_attend", "attend"

    def spec(self, path, module, x):
        _need_batch_axis(path, x, 2, "(batch, ..., features)")
        params = params_of(module, (EMBEDDING,))
        vocab, features = jnp.shape(params[EMBEDDING])
        if jnp.shape(x)[-1] != features:
            raise ValueError(
                f"value_grad_and_stats: nn.Embed {path!r} is tied: its lookup gives features of "
                f"size {features} (embedding {vocab}x{features}), but its attend was called on "
                f"an input of shape {jnp.shape(x)}, whose last axis should be {features}"
            )
        return _spec(path, "embed", self.block, params, d_in=vocab, d_out=features, layout=ATTEND)

    def inputs(self, spec, module, args, kwargs):
        x = first_input(args, kwargs)
        return x.reshape(x.shape[0], -1, spec.d_out)

    def outputs(self, spec, grad):
        return grad.reshape(grad.shape[0], -1, spec.d_in)


ATTEND = "attend"  # the layout of an attend call's spec
LOOKUP = "lookup"


def tied(specs: Sequence[BlockSpec]) -> BlockSpec | str | None:
    """The block of an embedding's calls when some go through ``attend``: one embed block whose
    ``layout`` is each call's role (:data:`LOOKUP` or :data:`ATTEND`), or the reason why there is
    none; ``None`` when no call is an ``attend`` or the calls differ in more than their role
    (the caller's check of calls as different blocks then applies)."""
    roles = tuple(ATTEND if s.layout == ATTEND else LOOKUP for s in specs)
    if ATTEND not in roles:
        return None
    if LOOKUP not in roles:
        return "nn.Embed used only through attend (no lookup call to tie it to)"
    first = dataclasses.replace(specs[0], layout=None)
    if any(dataclasses.replace(s, layout=None) != first for s in specs):
        return None
    return dataclasses.replace(first, layout=roles)


class _ScaleAndShift(_Kind):
    """Scale and shift of a normalisation layer: ``h = x̂``, the output with unit scale and zero
    shift (the module itself, applied with those parameters), features moved last;
    ``layout`` is the feature axes."""

    name, block = "scale_and_shift", "diagonal"
    modules = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm, nn.InstanceNorm)
    modules += (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.InstanceNorm)

    def feature_axes(self, module, ndim):
        if isinstance(module, (nn.BatchNorm, nnx.BatchNorm)):
            return _axes(module.axis, ndim)
        if isinstance(module, (nn.GroupNorm, nnx.GroupNorm)):
            return (ndim - 1,)
        return _axes(module.feature_axes, ndim)

    def spec(self, path, module, x):
        _need_batch_axis(path, x, 2, "(batch, ..., features)")
        params = params_of(module, (SCALE, BIAS))
        if not params:
            return "normalisation without scale or bias"
        axes = self.feature_axes(module, jnp.ndim(x))
        if 0 in axes:
            return "normalisation whose features include the batch axis"
        features = math.prod(jnp.shape(x)[a] for a in axes)
        return _spec(
            path,
            self.name,
            self.block,
            params,
            d_in=features,
            d_out=features * len(params),
            layout=tuple(a - jnp.ndim(x) for a in axes),
        )

    def inputs(self, spec, module, args, kwargs):
        if isinstance(module, nnx.Module):
            # A copy with unit scale and zero shift (its running statistics are discarded).
            unit = nnx.clone(module)
            for name, value in params_of(module, spec.names).items():
                getattr(unit, name).set_value(
                    jnp.ones_like(value) if name == SCALE else jnp.zeros_like(value)
                )
            return self.outputs(spec, getattr(type(unit), self.method)(unit, *args, **kwargs))
        variables = dict(module.variables)
        variables["params"] = {
            name: jnp.ones_like(p) if name == SCALE else jnp.zeros_like(p)
            for name, p in variables["params"].items()
            if name in spec.names
        }
        normalised = module.clone(parent=None).apply(variables, *args, **kwargs, mutable=True)[0]
        return self.outputs(spec, normalised)

    def outputs(self, spec, grad):
        axes = tuple(a % grad.ndim for a in spec.layout)
        grad = jnp.moveaxis(grad, axes, range(grad.ndim - len(axes), grad.ndim))
        return grad.reshape(grad.shape[0], -1, spec.d_in)


KINDS: tuple[_Kind, ...] = (
    _Dense(),
    _DenseGeneral(),
    _Einsum(),
    _Conv(),
    _ConvTranspose(),
    _Embed(),
    _EmbedAttend(),
    _ScaleAndShift(),
)
BY_NAME: dict[str, _Kind] = {kind.name: kind for kind in KINDS}


def kind_of(module: nn.Module, method: str) -> _Kind | None:
    """The kind of a module call, None for a call that is not a layer of the table."""
    for kind in KINDS:
        if kind.matches(module, method):
            return kind
    return None


# --- The block matrix of a spec's parameters, and back --------------------------------------------


def to_matrix(node: Mapping[str, jax.Array], spec: BlockSpec) -> jax.Array:
    """A block's parameters as its matrix, in the curvature dtype.

    Kronecker: ``[W; b]`` of shape ``(*stack, d_in_aug, d_out)``; embed: ``(vocab, d)``;
    diagonal: ``[scale.ravel(); bias.ravel()]`` of shape ``(*stack, d_out)``.
    """
    if spec.lifted:
        node = {name: node[name] for name in spec.names}
        return vmapped(lambda n: to_matrix(n, spec.unlifted()), spec.lifted)(node)
    if spec.block == "diagonal":
        return jnp.concatenate([jnp.ravel(node[n]).astype(spec.dtype) for n in spec.names])
    kind = BY_NAME[spec.kind]
    kernel = kind.weights(spec, node).astype(spec.dtype)
    if not spec.has_bias:
        return kernel
    bias = kind.bias_row(spec, node[BIAS]).astype(spec.dtype)
    return jnp.concatenate([kernel, bias], axis=-2)


def from_matrix(matrix: jax.Array, like: Mapping[str, jax.Array], spec: BlockSpec) -> dict:
    """Inverse of :func:`to_matrix`, with the shapes and dtypes of ``like``."""
    out = dict(like)
    if spec.lifted:
        inner = vmapped(lambda m, n: from_matrix(m, n, spec.unlifted()), spec.lifted)
        out.update(inner(matrix, {name: like[name] for name in spec.names}))
        return out
    if spec.block == "diagonal":
        offset = 0
        for name in spec.names:
            size = math.prod(jnp.shape(like[name]))
            part = matrix[offset : offset + size]
            out[name] = jnp.reshape(part, jnp.shape(like[name])).astype(like[name].dtype)
            offset += size
        return out
    kind = BY_NAME[spec.kind]
    weight = EMBEDDING if spec.block == "embed" else KERNEL
    kernel = kind.kernel_like(spec, matrix[..., : spec.d_in, :], like[weight])
    out[weight] = kernel.astype(like[weight].dtype)
    if spec.has_bias:
        bias = kind.bias_like(spec, matrix[..., spec.d_in, :], like[BIAS])
        out[BIAS] = bias.astype(like[BIAS].dtype)
    return out
