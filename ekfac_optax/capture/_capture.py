"""Capture: the blocks of a model, and the input ``h`` and output gradient ``delta`` of each.

Both functions run the user's loss under a Flax method interceptor
(``flax.linen.intercept_methods``; NNX models: ``_nnx``; the interceptor and the taps:
``_probes``) that looks every module call up in the layer-kind table (``_kinds.KINDS``).
``find_blocks`` runs it abstractly (``jax.eval_shape``, no FLOPs) and returns the blocks;
``value_grad_and_stats`` does the same abstract run, then runs the loss again, differentiated,
with every call of a block *tapped*: a ``custom_vjp`` identity on the layer's output whose
backward pass gives two zero "probes" the cotangents ``h`` and ``delta``. The probes ride in the
params, at the layer's node, so that every transform of the model (``nn.scan`` slices them with
the layer's parameters, ``nn.remat``, ``jax.checkpoint`` and ``jax.jit`` pass them through)
carries them where the layer runs, and their gradients bring ``h`` and ``delta`` out of any
trace. Since both functions take the blocks from the same run of the same table, the optimizer's
blocks and the captured stats agree by construction.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from ekfac_optax.capture import _fisher, _nnx, _probes
from ekfac_optax.capture._stats import LayerStats
from ekfac_optax.kinds import _blocks, _kinds

__all__ = ["LayerStats", "find_blocks", "value_grad_and_stats"]


def _with_entries(tree: Any, entries: dict[str, dict[str, Any]]) -> Any:
    """``tree`` (nested mappings) with ``entries[path]`` added to the node at each path."""
    if not entries:
        return tree
    own = entries.get("", {})
    children = {}
    for path, items in entries.items():
        if path:
            head, _, rest = path.partition("/")
            children.setdefault(head, {})[rest] = items
    out = dict(tree)
    for head, sub in children.items():
        out[head] = _with_entries(tree[head], sub)
    out.update(own)
    return type(tree)(out) if not isinstance(tree, dict) else out


def _without(tree: Any, name: str, paths) -> tuple[Any, dict[str, Any]]:
    """``tree`` without the entry ``name`` of the node at each path, and those entries."""
    taken = {}

    def strip(node, prefix):
        if not isinstance(node, Mapping):
            return node
        out = {}
        for key, value in node.items():
            if key == name and prefix in paths:
                taken[prefix] = value
                continue
            out[key] = strip(value, f"{prefix}/{key}" if prefix else str(key))
        return out if isinstance(node, dict) else type(node)(out)

    return strip(tree, ""), taken


def _check_params(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(
            "value_grad_and_stats: params must be the nested dict of a Flax model's "
            f"'params' collection, got {type(params).__name__}"
        )


def _marked(tree: Any, mark: dict[str, Any]) -> Any:
    """``tree`` (nested mappings) with the entries of ``mark`` added to every node."""
    out = {k: _marked(v, mark) if isinstance(v, Mapping) else v for k, v in tree.items()}
    out.update(mark)
    return out if isinstance(tree, dict) else type(tree)(out)


def _abstract_pass(loss_fn: Callable, params: Any, args, kwargs):
    """``(blocks as _probes.Call, fallback reasons)`` of one abstract run of ``loss_fn``.

    Every node of ``params`` gets an empty entry of a new name, so that a jitted function
    inside ``loss_fn`` (of the params or of a subtree) is traced again: its cached trace would
    run no module call.
    """
    _check_params(params)
    interceptor = _probes.Interceptor()
    marked = _marked(params, {f"__ekfac_pass_{next(_probes.PASSES)}__": {}})

    def run(params):
        with nn.intercept_methods(interceptor):
            loss_fn(params, *args, **kwargs)

    jax.eval_shape(run, marked)
    if not interceptor.modules and jax.tree.leaves(params):
        raise ValueError(
            "value_grad_and_stats: loss_fn(params, ...) ran no Flax linen module call, so no "
            "layer can be captured. Likely causes: the model is a Flax NNX module (pass the "
            "module itself: value_grad_and_stats(loss_fn)(model, ...) with loss_fn(model, "
            "...)); the loss applies the model outside loss_fn; or the loss does not depend "
            "on a linen model at all (then use an optax optimizer)."
        )
    return _probes.resolve(interceptor.found, params)


def find_blocks(loss_fn: Callable[..., Any], params: Any, *args, **kwargs):
    """The curvature blocks of the model that ``loss_fn`` applies, by the layer-kind table.

    Runs ``loss_fn(params, *args, **kwargs)`` abstractly (``jax.eval_shape``: shapes
    only, no FLOPs) and looks each Flax module call up in the table: every
    call of a supported kind (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` with an
    equation linear in its input, ``nn.Conv`` including grouped and depthwise,
    ``nn.ConvTranspose``, ``nn.Embed`` (also through ``attend``: a tied embedding, one
    block for both uses), and the scale and shift of ``nn.LayerNorm``, ``nn.RMSNorm``,
    ``nn.BatchNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm``) becomes a block. Every other
    parameter (an unsupported module, a parameter shared by two layers, a
    ``self.param`` of a custom module) is left to the
    preconditioner's fallback; :func:`summarize` lists which. A layer inside ``nn.scan`` or
    ``nn.vmap`` over layers (parameters stacked on a leading axis ``L``) is ``L`` blocks, one
    :class:`BlockSpec` with ``lifted == (L,)``.

    Args:
      loss_fn: the loss given to :func:`value_grad_and_stats`; its value is not used.
      params: the parameter tree (the ``"params"`` collection), or a Flax NNX model (then
        ``loss_fn(model, *args, **kwargs)``; the NNX classes of the same kinds).
      *args: a batch (or arrays of its shapes and dtypes) as ``loss_fn`` takes it.
      **kwargs: ``loss_fn``'s keyword arguments, likewise.

    Returns:
      A dict from module path to :class:`BlockSpec`, sorted by path: the ``blocks``
      argument of :func:`scale_by_ekfac`, :func:`scale_by_kfac` and their aliases. It is a
      :class:`Blocks`, whose ``reasons`` say why each other layer of a kind of the table falls
      back (shown by :func:`summarize`).

    Raises:
      ValueError: at trace time, for a supported layer called on an input that does
        not fit its kind (e.g. an ``nn.Embed`` on floats, a layer without a batch axis),
        naming the layer path and the expected and actual shapes; for a layer called
        inside ``jax.vmap`` over examples; for a loss that runs no layer of the model.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.LayerNorm(), nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x, y):
      ...     logits = model.apply({"params": params}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> for path, spec in ek.find_blocks(loss_fn, params, x, y).items():
      ...     print(path, "->", spec.describe())
      layers_0 -> kronecker block 6x8 of layers_0 [dense]
      layers_2 -> diagonal block (16 scalars) of layers_2 [scale_and_shift]
      layers_3 -> kronecker block 9x3 of layers_3 [dense]
    """
    if _kinds.is_nnx(params):
        calls, reasons = _nnx.abstract_pass(loss_fn, params, args, kwargs)
    else:
        calls, reasons = _abstract_pass(loss_fn, params, args, kwargs)
    return _blocks.Blocks({path: call.spec for path, call in calls.items()}, reasons)


def value_grad_and_stats(
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    *,
    layers: Sequence[str] | None = None,
    fisher: _fisher.TrueFisher | None = None,
) -> Callable[..., tuple[Any, Any, dict[str, LayerStats]]]:
    """Like ``jax.value_and_grad(loss_fn)``, plus each block's ``h`` and ``delta``.

    ``loss_fn(params, *args, **kwargs)`` must return the MEAN loss over the
    batch (a scalar; with ``has_aux``, a pair ``(loss, aux)``) and call a Flax
    linen model's ``apply`` inside, possibly through ``nn.scan`` or ``nn.vmap`` over
    layers, ``nn.remat``, ``nn.jit``, ``jax.checkpoint`` or ``jax.jit``. Every call of a
    layer that :func:`find_blocks` makes a block is captured, its calls as positions in
    call order; a layer called in a loop with shared parameters (``lax.scan`` or
    ``lax.map`` around ``apply``, ``nn.scan`` with ``variable_broadcast="params"``) is
    not supported (its iterations share one probe: their ``h`` and ``delta`` add up).
    Capture differentiates in reverse mode only (a ``custom_vjp``): no ``jax.jvp`` of it.
    Pass a Flax NNX model in place of ``params`` for ``loss_fn(model, ...)``: ``grads``
    is then the ``nnx.State`` of its ``nnx.Param`` gradients, for
    ``nnx.Optimizer.update(model, grads, stats=stats)``, and state the loss changes
    (batch statistics) is written back to the model, as ``nnx.value_and_grad`` does.

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
      fisher: ``None``: the statistics of ``loss_fn`` itself, with the dataset's labels (the
        empirical Fisher); an :class:`ekfac_optax.TrueFisher` (``samples=1``): the statistics
        of its loss, labels drawn from the model's predictive distribution with the key
        ``f(..., fisher_key=key)`` (the true Fisher; one more forward and backward pass: a
        model whose forward pass updates state, such as a training BatchNorm, updates it
        twice), while ``value`` and ``grads`` stay those of ``loss_fn``.

    Returns:
      ``f(params, *args, **kwargs) -> (value, grads, stats)``, where ``value``
      is ``loss`` (or ``(loss, aux)``), ``grads`` the gradient of the mean loss
      with respect to ``params`` and ``stats`` a dict from module path to
      :class:`LayerStats` (with ``fisher``: ``f(params, *args, fisher_key, **kwargs)``).

    Raises:
      ValueError: at trace time, for a layer called inside ``jax.vmap`` over examples (shared
        parameters), a loss that runs no layer of the model, a layer input that does not fit
        its kind, or ``layers`` that are no blocks.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> conv = nn.Sequential([nn.Conv(4, kernel_size=(3,)), nn.relu])
      >>> x = jnp.ones((2, 6, 3))  # 2 examples, 6 positions, 3 channels
      >>> params = conv.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x):
      ...     return jnp.mean(conv.apply({"params": params}, x) ** 2)
      >>> loss, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x)
      >>> stats["layers_0"].h.shape, stats["layers_0"].delta.shape  # (N, T, 3·3) and (N, T, 4)
      ((2, 6, 9), (2, 6, 4))
    """
    layers = _blocks.layer_paths(layers)
    if fisher is not None:
        return _with_true_fisher(loss_fn, has_aux, layers, fisher)

    def f(params, *args, **kwargs):
        if _kinds.is_nnx(params):
            return _nnx.value_grad_and_stats(loss_fn, has_aux, layers, params, args, kwargs)
        # Pass 1 (abstract, no FLOPs): the blocks and the shapes of their probes.
        calls, reasons = _abstract_pass(loss_fn, params, args, kwargs)
        calls = _probes.select(calls, layers, reasons)
        probes = {
            path: {
                _probes.PROBES: {
                    "h": tuple(jnp.zeros(s.shape, s.dtype) for s in call.h),
                    "delta": tuple(jnp.zeros(s.shape, s.dtype) for s in call.out),
                }
            }
            for path, call in calls.items()
        }
        unlifted = {path: call.spec.unlifted() for path, call in calls.items()}

        # Pass 2: the loss with every call of a block tapped, differentiated with respect
        # to the params and the probes (zeros at the layers' nodes of the params).
        def probed_loss(probed):
            with nn.intercept_methods(_probes.Interceptor(unlifted)):
                return _probes.split_loss(loss_fn(probed, *args, **kwargs), has_aux)

        (loss, aux), probed_grads = jax.value_and_grad(probed_loss, has_aux=True)(
            _with_entries(params, probes)
        )
        grads, probe_grads = _without(probed_grads, _probes.PROBES, set(calls))
        stats = _probes.stats_of(
            calls, lambda path: (probe_grads[path]["h"], probe_grads[path]["delta"])
        )
        return ((loss, aux) if has_aux else loss), grads, stats

    return f


def _with_true_fisher(loss_fn, has_aux, layers, fisher: _fisher.TrueFisher):
    """:func:`value_grad_and_stats` whose statistics are those of ``fisher``'s loss."""
    if not isinstance(fisher, _fisher.TrueFisher):
        raise TypeError(f"fisher must be None or an ek.TrueFisher, got {fisher!r}")
    if fisher.samples != 1:
        raise ValueError(
            "value_grad_and_stats: fisher= needs samples=1 (one row of statistics per example: "
            "EKFAC-ra's and the fallback's N g² read N from them); ek.fit_curvature takes any"
        )
    capture = value_grad_and_stats(functools.partial(fisher.loss, repeats=1), layers=layers)

    def f(params, *args, fisher_key, **kwargs):
        if _kinds.is_nnx(params):  # the model's nnx.Param gradients; its state written back
            grad_fn = nnx.value_and_grad(
                loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=has_aux
            )
            value, grads = grad_fn(params, *args, **kwargs)
        else:
            value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args, **kwargs)
        _, _, stats = capture(params, fisher_key, *args)
        return value, grads, stats

    return f
