"""Capture: the input ``h`` and output gradient ``delta`` of each layer.

``value_grad_and_stats`` runs the user's loss under a Flax method interceptor
(``flax.linen.intercept_methods``). For every call of a captured module
(``nn.Dense``, ``nn.Conv``; see ``_layers.CAPTURED_MODULES``) it records the
input and adds a zero "probe" to the output. The probes are differentiated
together with the params, so their gradients are the output gradients of the
layer, at no change to the user's model or loss.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.linear import canonicalize_padding

from ekfac_optax import _layers


class LayerStats(NamedTuple):
    """What a layer saw in one batch; positions ``t`` are conv output
    positions, extra input axes (e.g. sequence) and repeated calls of a shared
    module, concatenated.

    Attributes:
      h: ``(N, T, d_in)`` inputs (for conv: SUA patches, flattened in the
        order of ``kernel.reshape(d_in, d_out)``), without the bias coordinate.
      delta: ``(N, T, d_out)`` gradients of the per-example loss with respect
        to the layer outputs (``N`` times the gradient of the mean loss).
    """

    h: jax.Array
    delta: jax.Array


class _Call(NamedTuple):
    kind: str
    module: nn.Module
    inputs: jax.Array


class _Interceptor:
    """Records the captured calls; adds ``probes[path][i]`` to the i-th call's output."""

    def __init__(self, layers: frozenset[str] | None, probes: dict | None = None):
        self.layers = layers
        self.probes = probes
        self.calls: dict[str, list[_Call]] = {}
        self.outputs: dict[str, list[jax.Array]] = {}

    def __call__(self, next_fun, args, kwargs, context):
        kind = _layers.module_kind(context.module)
        path = _layers.path_key(context.module.path)
        if (
            context.method_name != "__call__"
            or kind is None
            or (self.layers is not None and path not in self.layers)
        ):
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        out = next_fun(*args, **kwargs)
        calls = self.calls.setdefault(path, [])
        if self.probes is not None:
            out = out + self.probes[path][len(calls)]
        calls.append(_Call(kind, context.module, inputs))
        self.outputs.setdefault(path, []).append(out)
        return out


def _conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
    """SUA input patches of a conv, ``(batch..., positions..., prod(k) * c_in)``.

    The input is padded (and dilated) as ``nn.Conv`` does — CIRCULAR, REFLECT
    and CAUSAL pad it as Flax does before a VALID convolution; string paddings
    resolve as in ``lax.conv_general_dilated`` (``lax.padtype_to_pads`` on the
    undilated input) — and each kernel offset's window is one strided slice of
    it: memory copies only, several times faster than the equivalent
    depthwise identity convolution on CPU. Features are offset-major,
    channel-minor, so feature ``f`` is row ``f`` of ``kernel.reshape(-1, c_out)``.
    """
    kernel_size = module.kernel_size
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    rank = len(kernel_size)

    def per_axis(value):
        value = 1 if value is None else value
        return (value,) * rank if isinstance(value, int) else tuple(value)

    strides, input_dilation, kernel_dilation = map(
        per_axis, (module.strides, module.input_dilation, module.kernel_dilation)
    )
    extent = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    n_batch = x.ndim - rank - 1
    padding = canonicalize_padding(module.padding, rank)
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
        pads = [((e - 1) // 2, e // 2) for e in extent]
        pads = [(extent[0] - 1, 0)] if padding == "CAUSAL" else pads
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}[padding]
        x = jnp.pad(x, [(0, 0)] * n_batch + pads + [(0, 0)], mode=mode)
        padding = "VALID"
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[n_batch:-1], extent, strides, padding)
    edges = [(lo, hi, d - 1) for (lo, hi), d in zip(padding, input_dilation, strict=True)]
    unpadded = [(0, 0, 0)] * n_batch
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), unpadded + edges + [(0, 0, 0)])
    out = [(n - e) // s + 1 for n, e, s in zip(x.shape[n_batch:-1], extent, strides, strict=True)]
    windows = []
    for offset in itertools.product(*map(range, kernel_size)):
        start = [o * d for o, d in zip(offset, kernel_dilation, strict=True)]
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out, strides, strict=True)]
        windows.append(
            jax.lax.slice(
                x,
                (0,) * n_batch + (*start, 0),
                (*x.shape[:n_batch], *limit, x.shape[-1]),
                (1,) * n_batch + (*strides, 1),
            )
        )
    return jnp.concatenate(windows, axis=-1)


def _layer_stats(path: str, calls: list[_Call], deltas: list[jax.Array], n: int) -> LayerStats:
    hs, ds = [], []
    for call, delta in zip(calls, deltas, strict=True):
        if delta.size == 0:
            raise ValueError(
                f"value_grad_and_stats: layer {path!r} produced an empty output of shape "
                f"{delta.shape} from an input of shape {call.inputs.shape} (e.g. a VALID conv "
                "whose kernel is larger than its input); it has no statistics"
            )
        h = call.inputs if call.kind == "dense" else _conv_patches(call.module, call.inputs)
        hs.append(jnp.reshape(h, (n, -1, h.shape[-1])))
        ds.append(jnp.reshape(delta, (n, -1, delta.shape[-1])))
    return LayerStats(h=jnp.concatenate(hs, axis=1), delta=jnp.concatenate(ds, axis=1))


def _batch_size(calls: dict[str, list[_Call]]) -> int:
    sizes = {path: c.inputs.shape[0] for path, cs in calls.items() for c in cs if c.inputs.ndim}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "value_grad_and_stats: captured layers disagree on the batch size (leading axis "
            f"of their inputs): {sizes}. Every captured layer must see inputs of shape "
            "(batch, ..., features)."
        )
    for path, cs in calls.items():
        for c in cs:
            if c.inputs.ndim < 2 or (c.kind == "conv" and c.inputs.ndim < 3):
                raise ValueError(
                    f"value_grad_and_stats: layer {path!r} was called on an input of shape "
                    f"{c.inputs.shape}; captured layers need a leading batch axis"
                )
    return next(iter(sizes.values()), 1)


def value_grad_and_stats(
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    *,
    layers: Sequence[str] | None = None,
) -> Callable[..., tuple[Any, Any, dict[str, LayerStats]]]:
    """Like ``jax.value_and_grad(loss_fn)``, plus each layer's ``h`` and ``delta``.

    ``loss_fn(params, *args, **kwargs)`` must return the MEAN loss over the
    batch (a scalar; with ``has_aux``, a pair ``(loss, aux)``) and call a Flax
    linen model's ``apply`` inside. Every call of an ``nn.Dense`` or ``nn.Conv``
    (``feature_group_count=1``, no ``mask``) on an input with a leading batch
    axis ``N`` is captured.

    The per-example output gradient is that of the per-example loss: since the
    loss is a batch mean, ``delta_n = N * dLoss/d(output_n)``. This is the one
    place where the factor ``N`` is applied.

    Args:
      loss_fn: the user's loss function, differentiated with respect to its
        first argument.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      layers: optional module paths to capture; ``None`` captures every
        supported layer. Use the same list as ``scale_by_ekfac(layers=...)``.

    Returns:
      ``f(params, *args, **kwargs) -> (value, grads, stats)``, where ``value``
      is ``loss`` (or ``(loss, aux)``), ``grads`` the gradient of the mean loss
      with respect to ``params`` and ``stats`` a dict from module path to
      :class:`LayerStats`.
    """
    layers = _layers.layer_paths(layers)
    layer_set = None if layers is None else frozenset(layers)

    def run(interceptor, params, args, kwargs):
        with nn.intercept_methods(interceptor):
            out = loss_fn(params, *args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        if jnp.shape(loss) != ():
            raise ValueError(
                "value_grad_and_stats: loss_fn must return a scalar (the mean loss over the "
                f"batch){' as the first item of (loss, aux)' if has_aux else ''}; got shape "
                f"{jnp.shape(loss)}"
            )
        return loss, aux

    def f(params, *args, **kwargs):
        # Pass 1 (abstract, no FLOPs): which layers are called, output shapes.
        def output_shapes(params):
            interceptor = _Interceptor(layer_set)
            run(interceptor, params, args, kwargs)
            return interceptor.outputs

        shapes = jax.eval_shape(output_shapes, params)
        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        # Pass 2: the loss with zero probes on the outputs, differentiated.
        captured = {}

        def probed_loss(params, probes):
            interceptor = _Interceptor(layer_set, probes)
            loss, aux = run(interceptor, params, args, kwargs)
            captured.update(interceptor.calls)
            inputs = {p: [c.inputs for c in cs] for p, cs in interceptor.calls.items()}
            return loss, (aux, inputs)

        (loss, (aux, inputs)), (grads, probe_grads) = jax.value_and_grad(
            probed_loss, argnums=(0, 1), has_aux=True
        )(params, probes)
        calls = {
            p: [c._replace(inputs=x) for c, x in zip(cs, inputs[p], strict=True)]
            for p, cs in captured.items()
        }
        n = _batch_size(calls)
        stats = {
            path: _layer_stats(path, cs, [n * d for d in probe_grads[path]], n)
            for path, cs in calls.items()
        }
        return ((loss, aux) if has_aux else loss), grads, stats

    return f
