"""Probes: how a layer call is tapped, and how the taps' gradients become :class:`LayerStats`.

The machinery that ``_capture`` (linen) and ``_nnx`` share. An :class:`Interceptor` looks every
module call up in the layer-kind table (``_kinds.KINDS``): in the abstract pass it records each
block's spec and the shapes of its statistics; in the differentiated pass it *taps* every call of
a block: a ``custom_vjp`` identity on the layer's output whose backward pass gives two zero
"probes" the cotangents ``h`` and ``delta``. :func:`resolve` turns the abstract pass's records
into blocks (lifted by ``nn.scan``/``nn.vmap``) and fallback reasons; :func:`stats_of` turns the
probes' gradients into :class:`LayerStats`.
"""

import dataclasses
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import partial_eval as pe

from ekfac_optax.capture._stats import LayerStats
from ekfac_optax.kinds import _blocks, _kinds, _patches

PROBES = "__ekfac_probes__"  # the variable of a captured layer that holds its probes


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


class Interceptor:
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
            variable = module.get_variable("params", PROBES)
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


class Call(NamedTuple):
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


def resolve(found: dict[str, dict[int, tuple]], params: Any):
    """The blocks of the abstract pass (as :class:`Call`), and why each other captured path
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
        blocks[path] = Call(spec, h, tuple(lifted(out) for _, _, out in calls))
    return blocks, reasons


PASSES = itertools.count()  # a new mark per abstract pass


def select(calls: dict[str, Call], layers, reasons) -> dict[str, Call]:
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


def stats_of(calls: dict[str, Call], probe_grads) -> dict[str, LayerStats]:
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


def _batch_size(calls: dict[str, list[jax.Array]]) -> int:
    sizes = {path: delta.shape[-3] for path, deltas in calls.items() for delta in deltas}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "value_grad_and_stats: captured layers disagree on the batch size (the example "
            f"axis of their inputs): {sizes}. Every captured layer must see inputs of shape "
            "(batch, ..., features)."
        )
    return next(iter(sizes.values()), 1)
