"""Capture: the blocks of a model, and the input ``h`` and output gradient ``delta`` of each.

Both functions run the user's loss under a Flax method interceptor
(``flax.linen.intercept_methods``) that looks every module call up in the
layer-kind table (``_kinds.KINDS``). ``find_blocks`` runs it abstractly
(``jax.eval_shape``, no FLOPs) and returns the blocks; ``value_grad_and_stats``
does the same abstract run, then runs the loss again with a zero "probe" added
to the output of every call of a block and records the call's ``h``. The
probes are differentiated together with the params, so their gradients are
the layers' output gradients, at no change to the user's model or loss. Since
both take the blocks from the same run of the same table, the optimizer's
blocks and the captured stats agree by construction.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from ekfac_optax import _blocks, _kinds


class LayerStats(NamedTuple):
    """What a block's layer saw in one batch; positions ``t`` are conv output
    positions, extra input axes (e.g. sequence) and repeated calls of a shared
    module, concatenated.

    Attributes:
      h: ``(*stack, N, T, d_in)`` inputs without the bias coordinate (conv:
        SUA patches, flattened in the order of the block matrix's rows;
        normalisation layers: the normalised input ``x̂``), or ``(N, T)``
        integer token ids for an embedding.
      delta: ``(*stack, N, T, d_out)`` gradients of the per-example loss with
        respect to the layer outputs (``N`` times the gradient of the mean loss;
        normalisation layers: ``d_out`` is the number of features).
    """

    h: jax.Array
    delta: jax.Array


class _Interceptor:
    """Looks module calls up in the kind table.

    Without ``blocks`` (the abstract pass) it records, per path, each call's spec or
    fallback reason and output. With ``blocks`` it records ``h`` of the calls of those
    blocks and adds ``probes[path][i]`` to the i-th call's output.
    """

    def __init__(self, blocks: dict | None = None, probes: dict | None = None):
        self.blocks = blocks
        self.probes = probes
        self.found: dict[str, list] = {}
        self.inputs: dict[str, list[jax.Array]] = {}
        self.outputs: dict[str, list[jax.Array]] = {}
        self.busy = False

    def __call__(self, next_fun, args, kwargs, context):
        kind = None if self.busy else _kinds.kind_of(context.module, context.method_name)
        path = _blocks.path_key(context.module.path)
        if kind is None or (self.blocks is not None and path not in self.blocks):
            return next_fun(*args, **kwargs)
        x = _kinds.first_input(args, kwargs)
        if self.blocks is None:
            self.found.setdefault(path, []).append(kind.spec(path, context.module, x))
        else:
            self.busy = True  # the kind may apply the module itself (normalised inputs)
            try:
                h = kind.inputs(self.blocks[path], context.module, args, kwargs)
            finally:
                self.busy = False
            self.inputs.setdefault(path, []).append(jax.lax.stop_gradient(h))
        out = next_fun(*args, **kwargs)
        if jnp.size(out) == 0:
            raise ValueError(
                f"value_grad_and_stats: layer {path!r} produced an empty output of shape "
                f"{jnp.shape(out)} from an input of shape {jnp.shape(x)} (e.g. a VALID conv "
                "whose kernel is larger than its input); it has no statistics"
            )
        outputs = self.outputs.setdefault(path, [])
        if self.probes is not None:
            out = out + self.probes[path][len(outputs)]
        outputs.append(out)
        return out


def _resolve(found: dict[str, list]) -> tuple[dict[str, _blocks.BlockSpec], dict[str, str]]:
    """The blocks of the abstract pass, and why each other captured path falls back."""
    blocks, reasons = {}, {}
    for path in sorted(found):
        specs = found[path]
        why = next((s for s in specs if isinstance(s, str)), None)
        if why is None and len(set(specs)) > 1:
            why = "called as different blocks: " + ", ".join(sorted({s.describe() for s in specs}))
        if why is None:
            blocks[path] = specs[0]
        else:
            reasons[path] = why
    return blocks, reasons


def _abstract_pass(loss_fn: Callable, params: Any, args, kwargs):
    """``(blocks, fallback reasons, output shapes)`` of one abstract run of ``loss_fn``."""
    interceptor = _Interceptor()

    def run(params):
        with nn.intercept_methods(interceptor):
            loss_fn(params, *args, **kwargs)
        return interceptor.outputs

    shapes = jax.eval_shape(run, params)
    blocks, reasons = _resolve(interceptor.found)
    return blocks, reasons, shapes


def find_blocks(loss_fn: Callable[..., Any], params: Any, *args, **kwargs):
    """The curvature blocks of the model that ``loss_fn`` applies, by the layer-kind table.

    Runs ``loss_fn(params, *args, **kwargs)`` abstractly (``jax.eval_shape``: shapes
    only, no FLOPs) and looks each Flax linen module call up in the table: every
    call of a supported kind (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``
    including grouped and depthwise, ``nn.ConvTranspose``, ``nn.Embed``, and the
    scale and shift of ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.BatchNorm``,
    ``nn.GroupNorm``, ``nn.InstanceNorm``) becomes a block. Every other
    parameter (an unsupported module, a parameter used in two roles such as a
    tied embedding, a ``self.param`` of a custom module) is left to the
    preconditioner's fallback; :func:`summarize` lists which.

    Args:
      loss_fn: the loss given to :func:`value_grad_and_stats`; its value is not used.
      params: the parameter tree (the ``"params"`` collection).
      *args, **kwargs: a batch (or arrays of its shapes and dtypes) as ``loss_fn`` takes it.

    Returns:
      A dict from module path to :class:`BlockSpec`, sorted by path: the ``blocks``
      argument of :func:`scale_by_ekfac`, :func:`scale_by_kfac` and their aliases.

    Raises:
      ValueError: at trace time, for a supported layer called on an input that does
        not fit its kind (e.g. an ``nn.Embed`` on floats, a layer without a batch axis),
        naming the layer path and the expected and actual shapes.
    """
    return _abstract_pass(loss_fn, params, args, kwargs)[0]


def _batch_size(calls: dict[str, list[jax.Array]]) -> int:
    sizes = {path: delta.shape[-3] for path, deltas in calls.items() for delta in deltas}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "value_grad_and_stats: captured layers disagree on the batch size (the example "
            f"axis of their inputs): {sizes}. Every captured layer must see inputs of shape "
            "(batch, ..., features)."
        )
    return next(iter(sizes.values()), 1)


def value_grad_and_stats(
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    *,
    layers: Sequence[str] | None = None,
) -> Callable[..., tuple[Any, Any, dict[str, LayerStats]]]:
    """Like ``jax.value_and_grad(loss_fn)``, plus each block's ``h`` and ``delta``.

    ``loss_fn(params, *args, **kwargs)`` must return the MEAN loss over the
    batch (a scalar; with ``has_aux``, a pair ``(loss, aux)``) and call a Flax
    linen model's ``apply`` inside. Every call of a layer that
    :func:`find_blocks` makes a block is captured.

    The per-example output gradient is that of the per-example loss: since the
    loss is a batch mean, ``delta_n = N * dLoss/d(output_n)``. This is the one
    place where the factor ``N`` is applied.

    Args:
      loss_fn: the user's loss function, differentiated with respect to its
        first argument.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      layers: optional module paths to capture (a dict of blocks: its keys);
        ``None`` captures every block. Pass the blocks given to the optimizer
        when that is a subset of ``find_blocks``.

    Returns:
      ``f(params, *args, **kwargs) -> (value, grads, stats)``, where ``value``
      is ``loss`` (or ``(loss, aux)``), ``grads`` the gradient of the mean loss
      with respect to ``params`` and ``stats`` a dict from module path to
      :class:`LayerStats`.
    """
    layers = _blocks.layer_paths(layers)

    def f(params, *args, **kwargs):
        # Pass 1 (abstract, no FLOPs): the blocks and their output shapes.
        blocks, reasons, shapes = _abstract_pass(loss_fn, params, args, kwargs)
        if layers is not None:
            unknown = sorted(set(layers) - set(blocks))
            if unknown:
                raise ValueError(
                    f"value_grad_and_stats: layers {unknown} are not blocks of this model "
                    f"(blocks: {sorted(blocks)}; falling back: {reasons})"
                )
            blocks = {path: blocks[path] for path in layers}
        probes = {path: [jnp.zeros(s.shape, s.dtype) for s in shapes[path]] for path in blocks}

        # Pass 2: the loss with zero probes on the outputs, differentiated.
        def probed_loss(params, probes):
            interceptor = _Interceptor(blocks, probes)
            with nn.intercept_methods(interceptor):
                out = loss_fn(params, *args, **kwargs)
            loss, aux = out if has_aux else (out, None)
            if jnp.shape(loss) != ():
                raise ValueError(
                    "value_grad_and_stats: loss_fn must return a scalar (the mean loss over the "
                    f"batch){' as the first item of (loss, aux)' if has_aux else ''}; got shape "
                    f"{jnp.shape(loss)}"
                )
            return loss, (aux, interceptor.inputs)

        (loss, (aux, inputs)), (grads, probe_grads) = jax.value_and_grad(
            probed_loss, argnums=(0, 1), has_aux=True
        )(params, probes)
        deltas = {
            path: [_kinds.BY_NAME[spec.kind].outputs(spec, g) for g in probe_grads[path]]
            for path, spec in blocks.items()
        }
        n = _batch_size(deltas)
        stats = {
            path: LayerStats(
                h=jnp.concatenate(inputs[path], axis=-1 if spec.block == "embed" else -2),
                delta=n * jnp.concatenate(deltas[path], axis=-2),
            )
            for path, spec in blocks.items()
        }
        return ((loss, aux) if has_aux else loss), grads, stats

    return f
