"""The true Fisher's statistics: a loss whose labels are drawn from the model's own predictive
distribution, so that its per-example gradients' second moment is the Fisher (not the empirical
Fisher of the dataset's labels).

Martens. New insights and perspectives on the natural gradient method. JMLR 2020.
https://arxiv.org/abs/1412.1193
Kunstner, Balles, Hennig. Limitations of the empirical Fisher approximation. NeurIPS 2019.
https://arxiv.org/abs/1905.12558
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

Distribution = Literal["categorical", "gaussian"]


@dataclasses.dataclass(frozen=True)
class TrueFisher:
    """Statistics of the true Fisher: labels drawn from the model's predictive distribution.

    ``predict_fn(params, *args)`` returns the model's outputs for the batch ``args`` (those of
    the loss, labels included, which it ignores): ``(N, ..., C)`` logits of a categorical
    distribution (softmax cross-entropy) or ``(N, ..., d)`` means of a Gaussian of unit
    variance (squared error). :meth:`loss` is the loss of labels ``ŷ`` drawn from them, its
    gradient taken with the draws fixed: the per-example gradients' second moment, in
    expectation over the draws, is the Fisher ``E_x E_{ŷ~p(·|x)}[∇log p(ŷ|x) ∇log p(ŷ|x)ᵀ]``,
    what natural gradient and influence functions ask for; the dataset's labels give the
    empirical Fisher instead, a different matrix away from a perfect fit (Kunstner et al.).

    The loss reduces as a mean loss does: the cross-entropy (the squared error halved and
    summed over the last axis) averaged over examples and every other axis (positions).

    Attributes:
      predict_fn: ``(params, *args) -> outputs``.
      distribution: ``"categorical"`` (logits) or ``"gaussian"`` (means, unit variance).
      samples: labels drawn per example (the batch is repeated that many times), or
        ``"exact"``: every label of a categorical (every output of a Gaussian) once, weighted
        by its probability, which gives the expectation itself (outputs ``(N, C)`` only:
        ``C`` times the work).
    """

    predict_fn: Callable[..., jax.Array]
    distribution: Distribution = "categorical"
    samples: int | Literal["exact"] = 1

    def __post_init__(self):
        if not callable(self.predict_fn):
            raise TypeError(f"TrueFisher: predict_fn must be callable, got {self.predict_fn!r}")
        if self.distribution not in ("categorical", "gaussian"):
            raise ValueError(
                "TrueFisher: distribution must be 'categorical' or 'gaussian', got "
                f"{self.distribution!r}"
            )
        samples = self.samples
        if samples != "exact" and (
            isinstance(samples, bool) or not isinstance(samples, int) or samples < 1
        ):
            raise ValueError(f"TrueFisher: samples must be an int >= 1 or 'exact', got {samples!r}")

    def repeats(self, params: Any, *args: Any) -> int:
        """How many rows each example becomes in :meth:`loss`."""
        if self.samples != "exact":
            return self.samples
        shape = jax.eval_shape(self.predict_fn, params, *args).shape
        if len(shape) != 2:
            raise ValueError(
                "TrueFisher: samples='exact' enumerates the labels of outputs (N, C); "
                f"predict_fn returns {shape} (positions draw their labels independently: use "
                "samples >= 1)"
            )
        return shape[-1]

    def loss(self, params: Any, key: jax.Array, *args: Any, repeats: int | None = None):
        """The mean loss of labels drawn with ``key`` (ignored with ``samples="exact"``), over
        the batch ``args`` repeated ``repeats`` times (example by example; ``None``:
        :meth:`repeats`, which runs ``predict_fn`` abstractly: pass it when capturing this
        loss, whose every run of the model is recorded)."""
        if repeats is None:
            repeats = self.repeats(params, *args)
        if repeats > 1:
            args = jax.tree.map(lambda a: jnp.repeat(a, repeats, axis=0), args)
        outputs = self.predict_fn(params, *args)
        fixed = jax.lax.stop_gradient(outputs)
        if self.samples == "exact":
            rows = outputs.shape[0]
            labels = jnp.tile(jnp.arange(repeats), rows // repeats)
            if self.distribution == "gaussian":  # the gradient of output k: E[εεᵀ] = I
                picked = jnp.take_along_axis(outputs, labels[:, None], axis=1)[:, 0]
                return jnp.mean(jnp.sqrt(repeats * 1.0) * picked)
            probs = jnp.take_along_axis(jax.nn.softmax(fixed), labels[:, None], axis=1)[:, 0]
            losses = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
            return jnp.mean(jnp.sqrt(repeats * probs) * losses)
        if self.distribution == "gaussian":
            drawn = fixed + jax.random.normal(key, outputs.shape, outputs.dtype)
            return jnp.mean(0.5 * jnp.sum((outputs - drawn) ** 2, axis=-1))
        labels = jax.random.categorical(key, fixed, axis=-1)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))
