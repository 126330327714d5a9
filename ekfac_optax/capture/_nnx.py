"""Capture for Flax NNX models: the layer-kind table and the probes of ``_probes``, for modules
that are Python objects instead of linen calls.

NNX has no method interceptor, so while ``loss_fn`` runs, the methods of the NNX classes of the
table (``nnx.Linear.__call__``, ...) are wrapped to pass through ``_probes.Interceptor.handle``.
The loss runs on a copy of the model (``nnx.split`` / ``nnx.merge``: the same arrays) whose
modules carry their path as a static attribute, so that a module rebuilt inside ``nnx.jit``,
``nnx.scan``, ``nnx.vmap`` or ``nnx.remat`` still knows it. In the differentiated pass each
captured layer also holds its probes as :class:`Probe` variables (``nnx.Param``\\ s, so that
the transforms map them over the same axes as the layer's parameters); their gradients are the
layer's ``h`` and output gradients. State the loss changes (batch statistics, RNG counts) is
written back to the user's model, as ``nnx.value_and_grad`` does.
"""

import contextlib
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ekfac_optax.capture import _probes
from ekfac_optax.kinds import _blocks, _kinds

_PATH = "_ekfac_path"  # a module's "/"-joined path, a static attribute of the copy
_PASS = "_ekfac_pass"  # a new value per abstract pass: a jitted function inside is traced again


class Probe(nnx.Param):
    """A zero array whose gradient is a layer's ``h`` or output gradient (capture only)."""


def _probe_name(which: str, index: int) -> str:
    return f"_ekfac_{which}_{index}"


def _tagged(model: nnx.Module, **attributes) -> tuple[nnx.Module, dict[str, nnx.Module]]:
    """A copy of ``model`` whose modules carry their paths (and ``attributes``), and the
    modules by path."""
    copy = nnx.merge(*nnx.split(model), copy=True)
    modules = {}
    for path, node in nnx.iter_graph(copy):
        if isinstance(node, nnx.Module):
            key = _blocks.path_key(path)
            _check_not_bridged(node, key)
            setattr(node, _PATH, key)
            for name, value in attributes.items():
                setattr(node, name, value)
            modules[key] = node
    return copy, modules


def _check_not_bridged(module: nnx.Module, path: str) -> None:
    """Raises for an ``nnx.bridge.ToNNX`` module: its layers are linen modules run by
    ``linen.Module.apply`` inside its call, where the NNX capture cannot reach them."""
    if isinstance(module, nnx.bridge.ToNNX):
        where = f"at {path!r}" if path else "as the model"
        inner = type(module.to_nnx__module).__name__
        raise TypeError(
            f"value_grad_and_stats: the NNX model holds an nnx.bridge.ToNNX module {where} "
            f"(the linen module {inner}); its layers run inside linen's apply, which the NNX "
            "capture cannot see. Capture the linen module instead: pass its parameters "
            "(nnx.to_pure_dict(nnx.state(model, nnx.Param)), paths such as 'Dense_0/kernel') "
            "to value_grad_and_stats with a loss that calls "
            "model.to_nnx__module.apply({'params': params}, ...), and apply the updates to "
            "those parameters; or build the model from NNX layers."
        )


def _classes() -> list[tuple[type, str]]:
    """The NNX classes of the kind table that define the kind's method themselves."""
    out = []
    for kind in _kinds.KINDS:
        for cls in kind.modules:
            if issubclass(cls, nnx.Module) and kind.method in vars(cls):
                if (cls, kind.method) not in out:
                    out.append((cls, kind.method))
    return out


_LOCK = threading.Lock()  # the patched methods are global: one capture at a time
_OWNER: list[int] = []  # the thread holding it


@contextlib.contextmanager
def _intercepting(interceptor: _probes.Interceptor):
    """The NNX layer methods routed through ``interceptor`` (tagged modules only); another
    thread's capture waits."""
    if _OWNER and _OWNER[0] == threading.get_ident():
        raise RuntimeError(
            "value_grad_and_stats: an NNX capture inside an NNX capture's loss is not supported"
        )
    _LOCK.acquire()
    _OWNER.append(threading.get_ident())
    originals = [(cls, method, vars(cls)[method]) for cls, method in _classes()]

    def wrap(method, original):
        def wrapped(self, *args, **kwargs):
            path = getattr(self, _PATH, None)
            if path is None:  # a module built inside the loss: not in the model's tree
                return original(self, *args, **kwargs)

            def next_fun(*args, **kwargs):
                return original(self, *args, **kwargs)

            def probes(index):
                h = getattr(self, _probe_name("h", index))
                delta = getattr(self, _probe_name("delta", index))
                return h.get_value(), delta.get_value()

            return interceptor.handle(self, method, path, next_fun, args, kwargs, probes)

        return wrapped

    try:
        for cls, method, original in originals:
            setattr(cls, method, wrap(method, original))
        yield
    finally:
        for cls, method, original in originals:
            setattr(cls, method, original)
        _OWNER.clear()
        _LOCK.release()


def abstract_pass(loss_fn: Callable, model: nnx.Module, args, kwargs):
    """``(blocks as _probes.Call, fallback reasons)`` of one abstract run of
    ``loss_fn(model, ...)``, on a tagged copy (the model is not changed)."""
    copy, modules = _tagged(model, **{_PASS: next(_probes.PASSES)})
    graphdef, state = nnx.split(copy)
    interceptor = _probes.Interceptor()

    def run(state):
        with _intercepting(interceptor):
            loss_fn(nnx.merge(graphdef, state, copy=True), *args, **kwargs)

    jax.eval_shape(run, state)
    classes = tuple(cls for cls, _ in _classes())
    layers = any(isinstance(module, classes) for module in modules.values())
    if layers and not interceptor.found:
        raise ValueError(
            "value_grad_and_stats: loss_fn(model, ...) called no NNX layer of the model "
            f"(kinds: {sorted({c.__name__ for c, _ in _classes()})}), so no layer can be "
            "captured. Likely causes: the loss calls a different model object than the one "
            "passed in, or layers created inside the loss."
        )
    return _probes.resolve(interceptor.found, _blocks.as_arrays(model))


def value_grad_and_stats(loss_fn, has_aux: bool, layers, model: nnx.Module, args, kwargs):
    """``_capture.value_grad_and_stats`` for an NNX model: ``(value, grads, stats)`` with
    ``grads`` the ``nnx.State`` of the model's ``nnx.Param`` gradients (as ``nnx.grad``)."""
    calls, reasons = abstract_pass(loss_fn, model, args, kwargs)
    calls = _probes.select(calls, layers, reasons)
    copy, modules = _tagged(model)
    for path, call in calls.items():
        for which, shapes in (("h", call.h), ("delta", call.out)):
            for index, shape in enumerate(shapes):
                setattr(
                    modules[path],
                    _probe_name(which, index),
                    Probe(jnp.zeros(shape.shape, shape.dtype)),
                )
    graphdef, probes, params, rest = nnx.split(copy, Probe, nnx.Param, ...)
    unlifted = {path: call.spec.unlifted() for path, call in calls.items()}

    def probed_loss(params, probes, rest):  # rest: an argument, so that the loss can update it
        model = nnx.merge(graphdef, probes, params, rest, copy=True)
        with _intercepting(_probes.Interceptor(unlifted)):
            loss, aux = _probes.split_loss(loss_fn(model, *args, **kwargs), has_aux)
        return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (aux, new_rest)), (grads, probe_grads) = jax.value_and_grad(
        probed_loss, argnums=(0, 1), has_aux=True
    )(params, probes, rest)
    nnx.update(model, new_rest)
    probe_grads = nnx.to_pure_dict(probe_grads)

    def by_path(path):
        node, call = _blocks.subtree(probe_grads, path), calls[path]
        hs = [node[_probe_name("h", i)] for i in range(len(call.h))]
        return hs, [node[_probe_name("delta", i)] for i in range(len(call.out))]

    stats = _probes.stats_of(calls, by_path)
    return ((loss, aux) if has_aux else loss), grads, stats
