"""Helpers shared by the benchmark scripts: resident-memory probes (Linux ``/proc``, with ``getrusage`` as the
fallback) and the plain forward + backward pass that per-sample gradients are compared with."""
import resource
import sys
from typing import Any, Callable, Optional

import keras
import tensorflow as tf

KIB = 1024


def proc_status_kib(field_name: str, pid: str = "self") -> Optional[int]:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's kernel high-water mark of resident memory (Linux >= 4.0); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_kib() -> int:
    """Peak resident set size of this process so far, in KiB (``ru_maxrss`` is in bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // KIB if sys.platform == "darwin" else peak


class PeakMemory:
    """Context manager measuring how much the resident set grew at its peak during the block (``delta_mib``), with
    the kernel's high-water mark reset at entry (Linux); elsewhere the growth of ``ru_maxrss``."""

    def __init__(self):
        self.delta_mib = 0.0
        self._start_kib = 0
        self._per_block = False

    def __enter__(self) -> "PeakMemory":
        self._per_block = reset_peak_rss() and proc_status_kib("VmHWM") is not None
        current = proc_status_kib("VmRSS") if self._per_block else None
        self._start_kib = current if current is not None else ru_maxrss_kib()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        peak = proc_status_kib("VmHWM") if self._per_block else None
        peak = peak if peak is not None else ru_maxrss_kib()
        self.delta_mib = max(peak - self._start_kib, 0) / KIB


def plain_step(model: keras.Model, loss_function: Callable) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Compiled forward + backward of a batch's summed loss w.r.t. all trainable weights: one flat (P,) gradient.

    The same arithmetic on the same data without one gradient per sample: the practical lower bound. Written as a
    user would (``model(x)`` under a tape), not with the faster ``model.stateless_call``: the baseline is what a
    user pays (the difference measured is in ``benchmarks/README.md``).
    """
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def step(inputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_function(targets, model(inputs, training=False)))
        gradients = tape.gradient(loss, variables)
        return tf.concat([tf.reshape(gradient, [-1]) for gradient in gradients], axis=0)

    return step
