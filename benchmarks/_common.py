"""Pieces shared by the benchmarks: their command line, their result files, the machine's
description and kfac-jax, the external peer."""

import argparse
import csv
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


def base_parser(doc: str, quick: str, seed: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick`` (the smoke run of the tests and CI; ``quick``
    says what it does), ``--out`` (the results folder) and, with ``seed``, ``--seed``; the
    description is the first paragraph of the module's ``doc``."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    return parser


def write_results(out: str, name: str, text: str, rows: list[dict] | None = None) -> dict:
    """Writes ``out/name.md`` (the report ``text``, also printed) and, with ``rows``,
    ``out/name.csv`` (one row per dict, the first one's keys as columns); their paths."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, name)
    paths = {"md": stem + ".md"}
    if rows is not None:
        paths["csv"] = stem + ".csv"
        with open(paths["csv"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(paths["md"], "w") as f:
        f.write(text)
    print(text)
    return paths


def comma_floats(text: str | None, default) -> list[float]:
    """The value of a comma-list option (``--lrs 1,0.1``) as floats; ``default`` without one."""
    return list(default) if text is None else [float(v) for v in text.split(",")]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> str:
    """One line: CPU, cores, architecture, Python, jax and its backend."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores visible ({platform.machine()}), Python "
        f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )


def import_kfac_jax() -> Any:
    """kfac-jax, made to run on this JAX; raises if it is not installed.

    kfac-jax 0.0.8's tracer unpacks ``subfuns, params = primitive.get_bind_params(params)``;
    since JAX 0.7 ``get_bind_params`` returns the params alone, so every step raises
    ``ValueError: too many values to unpack``. Its one-equation evaluator is replaced by the
    equivalent of ``jax.core.eval_jaxpr``'s loop body (a compatibility shim with no effect on
    what is computed or on its cost).
    """
    import kfac_jax
    from kfac_jax._src import tag_graph_matcher

    def eval_jaxpr_eqn(eqn, in_values):
        params = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(params, tuple):  # JAX < 0.7: (subfuns, params)
            subfuns, params = params
            in_values = [*subfuns, *in_values]
        with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
            out = eqn.primitive.bind(*in_values, **params)
        return list(out) if eqn.primitive.multiple_results else [out]

    tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn
    return kfac_jax


def kfac_jax_status(probe: Callable[[Any], str] | None = None) -> tuple[Any, str]:
    """``(kfac_jax, "")`` if kfac-jax imports (and ``probe(kfac_jax)``, e.g. a step on a tiny
    problem, returns no reason against it), else ``(None, reason)``."""
    try:
        kfac_jax = import_kfac_jax()
        reason = probe(kfac_jax) if probe is not None else ""
    except Exception as e:  # any failure means "unavailable", with its reason
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return (None, reason) if reason else (kfac_jax, "")


def kfac_jax_optimizer(
    kfac_jax: Any,
    loss_fn: Callable,
    learning_rate: float,
    damping: float,
    factor_decay: float,
    period: int,
) -> Any:
    """kfac-jax's KFAC configured as ours: fixed learning rate and damping, no momentum.

    ``use_exact_inverses=True`` inverts ``A ⊗ B + damping I`` exactly through the ``eigh`` of
    ``A`` and ``B`` every ``period`` steps (like our ``damping_mode="tikhonov"``) rather than its
    default pi-adjusted factored damping; ``estimation_mode="fisher_empirical"`` uses the true
    labels, like our statistics. ``loss_fn`` must register its loss with kfac-jax.
    """
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        learning_rate_schedule=lambda _: learning_rate,
        use_adaptive_momentum=False,
        momentum_schedule=lambda _: 0.0,
        use_adaptive_damping=False,
        damping_schedule=lambda _: damping,
        curvature_ema=factor_decay,
        inverse_update_period=period,
        use_exact_inverses=True,
        estimation_mode="fisher_empirical",
        num_burnin_steps=0,
        multi_device=False,
    )


class Progress:
    """A progress line on stderr for a long run of ``total`` equal units (epochs of a run, steps
    of all runs): ``[k/total] what, elapsed, ETA`` (the ETA from the mean time of the units done
    so far), rewritten in place; ``done()`` ends the line."""

    def __init__(self, total: int, every: int = 1):
        self.total, self.every, self.count = total, every, 0
        self.start = time.perf_counter()

    def advance(self, what: str = "") -> None:
        self.count += 1
        if self.count % self.every and self.count != self.total:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.count * (self.total - self.count)
        line = f"[{self.count}/{self.total}] {what}, {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
        print(f"\r{line[:110]:<110}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        print(file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"
