"""Capture: the blocks of a model, and the input ``h`` and output gradient ``delta`` of each.

Both functions run the user's loss under a Flax method interceptor
(``flax.linen.intercept_methods``; NNX models: ``_nnx``) that looks every module call up in
the layer-kind table (``_kinds.KINDS``). ``find_blocks`` runs it abstractly
(``jax.eval_shape``, no FLOPs) and returns the blocks; ``value_grad_and_stats`` does the same
abstract run, then runs the loss again, differentiated, with every call of a block *tapped*: a
``custom_vjp`` identity on the layer's output whose backward pass gives two zero "probes" the
cotangents ``h`` and ``delta``. The probes ride in the params, at the layer's node, so that
every transform of the model (``nn.scan`` slices them with the layer's parameters, ``nn.remat``,
``jax.checkpoint`` and ``jax.jit`` pass them through) carries them where the layer runs, and
their gradients bring ``h`` and ``delta`` out of any trace. Since both functions take the
blocks from the same run of the same table, the optimizer's blocks and the captured stats agree
by construction.
"""

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax._src import core as jax_core
from jax._src.interpreters import partial_eval as pe

from ekfac_optax import _blocks, _kinds, _patches


class LayerStats(NamedTuple):
    """What a block's layer saw in one batch; positions ``t`` are conv output
    positions, extra input axes (e.g. sequence) and repeated calls of a shared
    module, concatenated.

    Attributes:
      h: ``(*stack, N, T, d_in)`` inputs without the bias coordinate (conv:
        SUA patches, flattened in the order of the block matrix's rows, held as
        :class:`~ekfac_optax._patches.Patches` of the padded input, which
        ``np.asarray`` or ``.dense()`` materialise; normalisation layers: the
        normalised input ``x̂``), or ``(N, T)`` integer token ids for an embedding.
      delta: ``(*stack, N, T, d_out)`` gradients of the per-example loss with
        respect to the layer outputs (``N`` times the gradient of the mean loss;
        normalisation layers: ``d_out`` is the number of features).
      attend_h: a tied embedding's (an ``nn.Embed`` also called through ``attend``)
        ``(N, S, d)`` inputs of its attend calls; ``None`` for every other block.
      attend_delta: ``(N, S, vocab)`` gradients of the per-example loss with respect to the
        attend calls' outputs (the logits); ``None`` for every other block.
    """

    h: jax.Array
    delta: jax.Array
    attend_h: jax.Array | None = None
    attend_delta: jax.Array | None = None


_PROBES = "__ekfac_probes__"  # the variable of a captured layer that holds its probes


@jax.custom_vjp
def _tap(out, h, probe_h, probe_delta):
    """``out``; differentiated, gives ``probe_h`` the cotangent ``h`` and ``probe_delta``
    the output's, so that both leave every transform of the model as gradients."""
    del h, probe_h, probe_delta
    return out


def _tap_fwd(out, h, probe_h, probe_delta):
    del probe_h, probe_delta
    return out, h


def _tap_bwd(h, g):
    return g, jnp.zeros_like(h), h, g


_tap.defvjp(_tap_fwd, _tap_bwd)


def _refuse_mapped_inputs(path: str, x: jax.Array, weight: jax.Array) -> None:
    """Raises, at trace time, if ``x`` is mapped by a ``vmap`` that ``weight`` is not."""

    @jax.custom_batching.custom_vmap
    def check(x, weight):
        return x

    @check.def_vmap
    def rule(axis_size, in_batched, x, weight):
        if in_batched[0] and not in_batched[1]:
            raise ValueError(
                f"value_grad_and_stats: layer {path!r} is called inside jax.vmap (or nn.vmap) "
                "over its inputs with its parameters shared: capture needs the whole batch in "
                "one call. Apply the model to the batch (Flax layers take any number of "
                "leading batch axes) instead of vmapping the loss over examples."
            )
        return x, in_batched[0]

    check(x, weight)


class _Interceptor:
    """Looks module calls up in the kind table; the calls of a path are numbered in order.

    Without ``blocks`` (the abstract pass) it records, per path and call, the spec or
    fallback reason and the shapes of ``h`` and of the output. With ``blocks`` (unlifted
    specs) it taps each call of those blocks with its probes.
    """

    def __init__(self, blocks: dict | None = None):
        self.blocks = blocks
        self.found: dict[str, dict[int, tuple]] = {}
        self.calls: dict[str, int] = {}  # path -> index of its last call
        self.modules = 0
        self.busy = False

    def _inputs(self, kind, spec, module, args, kwargs):
        self.busy = True  # the kind may apply the module itself (normalised inputs)
        try:
            return kind.inputs(spec, module, args, kwargs)
        finally:
            self.busy = False

    def __call__(self, next_fun, args, kwargs, context):
        """The linen interceptor (``nn.intercept_methods``)."""
        module = context.module

        def probes(index):
            variable = module.get_variable("params", _PROBES)
            return variable["h"][index], variable["delta"][index]

        path = _blocks.path_key(module.path)
        return self.handle(module, context.method_name, path, next_fun, args, kwargs, probes)

    def handle(self, module, method, path, next_fun, args, kwargs, probes):
        """One call of ``module.method``: ``probes(i)`` gives the i-th call's ``(h, delta)``
        probes (pass 2 only)."""
        if self.busy:
            return next_fun(*args, **kwargs)
        self.modules += 1
        kind = _kinds.kind_of(module, method)
        if kind is None or (self.blocks is not None and path not in self.blocks):
            return next_fun(*args, **kwargs)
        x = _kinds.first_input(args, kwargs)
        weights = jax.tree.leaves(_kinds.params_of(module))
        if _in_partial_eval(x, weights):
            return next_fun(*args, **kwargs)
        index = self.calls[path] = self.calls.get(path, -1) + 1  # calls of a path, in order
        if self.blocks is None:
            if weights:
                _refuse_mapped_inputs(path, x, weights[0])
            spec = kind.call_spec(path, module, args, kwargs)
            h = None
            if not isinstance(spec, str):
                h = kind.probe(self._inputs(kind, spec, module, args, kwargs))
            out = next_fun(*args, **kwargs)
            if jnp.size(out) == 0:
                raise ValueError(
                    f"value_grad_and_stats: layer {path!r} produced an empty output of shape "
                    f"{jnp.shape(out)} from an input of shape {jnp.shape(x)} (e.g. a VALID conv "
                    "whose kernel is larger than its input); it has no statistics"
                )
            self.found.setdefault(path, {})[index] = (spec, _shape_of(h), _shape_of(out))
            return out
        spec = self.blocks[path]
        h = jax.lax.stop_gradient(kind.probe(self._inputs(kind, spec, module, args, kwargs)))
        out = next_fun(*args, **kwargs)
        probe_h, probe_delta = probes(index)
        return _tap(out, h.astype(probe_h.dtype), probe_h, probe_delta)


def _in_partial_eval(x, weights) -> bool:
    """Whether a call runs in a partial-evaluation trace whose results are discarded: Flax's
    ``nn.scan`` traces its body once that way (to check that broadcast values are loop
    invariants) before the scan itself. Such calls are neither recorded nor tapped, so that
    the calls of a path are numbered once each, in order.

    The call's own values are partial-eval tracers when the layer runs in that trace
    directly; inside a transform that traces its body to a jaxpr there (``nn.remat`` or
    ``jax.checkpoint`` in an ``nn.scan`` body) they belong to that transform's trace, whose
    parent is the partial-eval one: so the traces above the current one are walked through
    jaxpr-building traces (which only record) up to the first other trace.
    """
    if any(isinstance(leaf, pe.JaxprTracer) for leaf in [x, *weights]):
        return True
    trace = _current_trace()
    while isinstance(trace, pe.DynamicJaxprTrace):
        trace = getattr(trace, "parent_trace", None)
    return isinstance(trace, pe.JaxprTrace)


def _current_trace():
    """JAX's current trace (``None`` where this JAX does not expose it)."""
    context = getattr(jax_core, "trace_ctx", None)
    return getattr(context, "trace", None)


def _shape_of(x) -> jax.ShapeDtypeStruct | None:
    return None if x is None else jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


class _Call(NamedTuple):
    """What the abstract pass learnt of a block: its spec and, per call, the shapes of the
    probes of ``h`` and of the output (lifted axes included)."""

    spec: _blocks.BlockSpec
    h: tuple[jax.ShapeDtypeStruct, ...]
    out: tuple[jax.ShapeDtypeStruct, ...]


def _lift(spec: _blocks.BlockSpec, params: Any) -> _blocks.BlockSpec | str:
    """``spec`` (as the layer saw its parameters) with the leading axes that a lifted
    transform (``nn.scan``, ``nn.vmap``) added to them in ``params``; or why not."""
    node = _blocks.subtree(params, spec.path)
    if node is None:
        return (
            f"no node {spec.path!r} in the params given (the loss applies the layer with "
            "parameters from elsewhere)"
        )
    leads = set()
    for name, inner in spec.params:
        outer = tuple(jnp.shape(node[name])) if name in node else None
        if outer is None or len(outer) < len(inner) or outer[len(outer) - len(inner) :] != inner:
            return (
                f"parameter {name!r} of shape {outer} is seen by the layer as {inner} (a "
                "transform maps it over an axis other than the leading ones)"
            )
        leads.add(outer[: len(outer) - len(inner)])
    if len(leads) > 1:
        return f"its parameters are mapped over different axes {sorted(leads)}"
    lifted = leads.pop()
    if not lifted:
        return spec
    if spec.block == "embed":
        return "nn.Embed inside nn.scan / nn.vmap (a stacked embedding is not supported)"
    return dataclasses.replace(
        spec,
        params=tuple((name, tuple(jnp.shape(node[name]))) for name, _ in spec.params),
        stack=lifted + spec.stack,
        lifted=lifted,
    )


def _resolve(found: dict[str, dict[int, tuple]], params: Any):
    """The blocks of the abstract pass (as :class:`_Call`), and why each other captured path
    falls back."""
    blocks, reasons = {}, {}
    for path in sorted(found):
        calls = [found[path][i] for i in sorted(found[path])]
        specs = [spec for spec, _, _ in calls]
        why = next((s for s in specs if isinstance(s, str)), None)
        joined = None if why is not None else _kinds.tied(specs)
        if isinstance(joined, str):
            why = joined
        elif why is None and joined is None and len(set(specs)) > 1:
            why = "called as different blocks: " + ", ".join(sorted({s.describe() for s in specs}))
        spec = why if why is not None else _lift(joined or specs[0], params)
        if isinstance(spec, str):
            reasons[path] = spec
            continue

        def lifted(shape, spec=spec):
            return jax.ShapeDtypeStruct(spec.lifted + shape.shape, shape.dtype)

        def probe_h(call_spec, h, spec=spec):
            # Differentiated, so float: token ids as float32 (exact below 2^24, never lifted),
            # other integer inputs (e.g. uint8 images) in the curvature dtype.
            if spec.block == "embed" and call_spec.layout != _kinds.ATTEND:
                return jax.ShapeDtypeStruct(h.shape, jnp.float32)
            dtype = h.dtype if jnp.issubdtype(h.dtype, jnp.inexact) else spec.dtype
            return jax.ShapeDtypeStruct(spec.lifted + h.shape, dtype)

        h = tuple(probe_h(call_spec, h) for call_spec, h, _ in calls)
        blocks[path] = _Call(spec, h, tuple(lifted(out) for _, _, out in calls))
    return blocks, reasons


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


PASSES = itertools.count()  # a new mark per abstract pass


def _marked(tree: Any, mark: dict[str, Any]) -> Any:
    """``tree`` (nested mappings) with the entries of ``mark`` added to every node."""
    out = {k: _marked(v, mark) if isinstance(v, Mapping) else v for k, v in tree.items()}
    out.update(mark)
    return out if isinstance(tree, dict) else type(tree)(out)


def _abstract_pass(loss_fn: Callable, params: Any, args, kwargs):
    """``(blocks as _Call, fallback reasons)`` of one abstract run of ``loss_fn``.

    Every node of ``params`` gets an empty entry of a new name, so that a jitted function
    inside ``loss_fn`` (of the params or of a subtree) is traced again: its cached trace would
    run no module call.
    """
    _check_params(params)
    interceptor = _Interceptor()
    marked = _marked(params, {f"__ekfac_pass_{next(PASSES)}__": {}})

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
    return _resolve(interceptor.found, params)


def select(calls: dict[str, _Call], layers, reasons) -> dict[str, _Call]:
    """The calls of ``layers`` (all for None); a ValueError for a layer that is no block."""
    if layers is None:
        return calls
    unknown = sorted(set(layers) - set(calls))
    if unknown:
        raise ValueError(
            f"value_grad_and_stats: layers {unknown} are not blocks of this model "
            f"(blocks: {sorted(calls)}; falling back: {reasons})"
        )
    return {path: calls[path] for path in layers}


def split_loss(out, has_aux: bool):
    """``(loss, aux)`` of ``loss_fn``'s output, checked to be a scalar loss (and a pair with
    ``has_aux``, a single value without)."""
    if not has_aux and isinstance(out, tuple | list):
        raise ValueError(
            f"value_grad_and_stats: loss_fn returned a {type(out).__name__} of {len(out)} items; "
            "a loss_fn that returns (loss, aux) needs has_aux=True: "
            "ek.value_grad_and_stats(loss_fn, has_aux=True)"
        )
    if has_aux and not (isinstance(out, tuple | list) and len(out) == 2):
        got = (
            f"a {type(out).__name__} of {len(out)} items"
            if isinstance(out, tuple | list)
            else f"a single value of shape {jnp.shape(out)}"
        )
        raise ValueError(
            "value_grad_and_stats: with has_aux=True, loss_fn must return a pair (loss, aux); "
            f"got {got}"
        )
    loss, aux = out if has_aux else (out, None)
    if jnp.shape(loss) != ():
        raise ValueError(
            "value_grad_and_stats: loss_fn must return a scalar (the mean loss over the "
            f"batch){' as the first item of (loss, aux)' if has_aux else ''}; got shape "
            f"{jnp.shape(loss)}"
        )
    return loss, aux


def stats_of(calls: dict[str, _Call], probe_grads) -> dict[str, LayerStats]:
    """The stats from the probes' gradients, ``probe_grads(path) -> (hs, deltas)`` per call."""
    inputs, deltas, attends = {}, {}, {}
    for path, call in calls.items():
        spec = call.spec
        outputs = _blocks.vmapped(
            lambda g, spec=spec: _kinds.BY_NAME[spec.kind].outputs(spec.unlifted(), g),
            spec.lifted,
        )
        hs, gs = probe_grads(path)
        if spec.tied:  # the calls through attend apart from the lookups
            attend = _kinds.BY_NAME["embed_attend"]
            roles = spec.layout
            pairs = [
                (h, attend.outputs(spec, g))
                for h, g, role in zip(hs, gs, roles, strict=True)
                if role == _kinds.ATTEND
            ]
            attends[path] = pairs
            hs = [h for h, role in zip(hs, roles, strict=True) if role == _kinds.LOOKUP]
            gs = [g for g, role in zip(gs, roles, strict=True) if role == _kinds.LOOKUP]
        deltas[path] = [outputs(g) for g in gs]
        kind = _kinds.BY_NAME[spec.kind]
        hs = [kind.from_probe(spec, h) for h in hs]
        if len(hs) > 1:  # the calls' positions concatenated (a convolution's patches dense)
            hs = [_patches.dense(h) for h in hs]
        inputs[path] = [jnp.round(h).astype(jnp.int32) if spec.block == "embed" else h for h in hs]
    n = _batch_size(deltas)

    def attend_stats(path):
        if path not in attends:
            return {}
        hs, gs = zip(*attends[path], strict=True)
        return dict(
            attend_h=jnp.concatenate(hs, axis=-2), attend_delta=n * jnp.concatenate(gs, axis=-2)
        )

    return {
        path: LayerStats(
            h=_concatenate(inputs[path], axis=-1 if call.spec.block == "embed" else -2),
            delta=n * jnp.concatenate(deltas[path], axis=-2),
            **attend_stats(path),
        )
        for path, call in calls.items()
    }


def _concatenate(hs: list[Any], axis: int) -> Any:
    return hs[0] if len(hs) == 1 else jnp.concatenate(hs, axis=axis)


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
      *args, **kwargs: a batch (or arrays of its shapes and dtypes) as ``loss_fn`` takes it.

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
    """
    if _kinds.is_nnx(params):
        from ekfac_optax import _nnx  # builds on this module

        calls, reasons = _nnx.abstract_pass(loss_fn, params, args, kwargs)
    else:
        calls, reasons = _abstract_pass(loss_fn, params, args, kwargs)
    return _blocks.Blocks({path: call.spec for path, call in calls.items()}, reasons)


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

    Returns:
      ``f(params, *args, **kwargs) -> (value, grads, stats)``, where ``value``
      is ``loss`` (or ``(loss, aux)``), ``grads`` the gradient of the mean loss
      with respect to ``params`` and ``stats`` a dict from module path to
      :class:`LayerStats`.

    Raises:
      ValueError: at trace time, for a layer called inside ``jax.vmap`` over examples (shared
        parameters), a loss that runs no layer of the model, a layer input that does not fit
        its kind, or ``layers`` that are no blocks.
    """
    layers = _blocks.layer_paths(layers)

    def f(params, *args, **kwargs):
        if _kinds.is_nnx(params):
            from ekfac_optax import _nnx  # builds on this module

            return _nnx.value_grad_and_stats(loss_fn, has_aux, layers, params, args, kwargs)
        # Pass 1 (abstract, no FLOPs): the blocks and the shapes of their probes.
        calls, reasons = _abstract_pass(loss_fn, params, args, kwargs)
        calls = select(calls, layers, reasons)
        probes = {
            path: {
                _PROBES: {
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
            with nn.intercept_methods(_Interceptor(unlifted)):
                return split_loss(loss_fn(probed, *args, **kwargs), has_aux)

        (loss, aux), probed_grads = jax.value_and_grad(probed_loss, has_aux=True)(
            _with_entries(params, probes)
        )
        grads, probe_grads = _without(probed_grads, _PROBES, set(calls))
        stats = stats_of(calls, lambda path: (probe_grads[path]["h"], probe_grads[path]["delta"]))
        return ((loss, aux) if has_aux else loss), grads, stats

    return f
