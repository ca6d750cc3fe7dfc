"""Vectorization rules of our own for per-sample gradients, installed only while our kernels are traced.

``tf.vectorized_map`` (pfor) rewrites every op of a per-sample function into one op over the whole batch. Two of
TensorFlow's rewrites are replaced while :func:`per_sample_converters` is active:

* **Conv2DBackpropFilter** (the filter gradient of a convolution) with a per-sample input: TensorFlow converts it
  into a sequential ``while_loop`` over the samples ("Conv2DBackpropFilter uses a while_loop. Fix that!"). Here the
  per-sample filter gradients are one batched product of image patches with output gradients,
  ``dW_i[kh, kw, c, o] = Σ_{h, w} patch_i[h, w, (kh, kw, c)] · dy_i[h, w, o]``. NCHW, explicit padding, unknown
  filter sizes and unstacked inputs keep TensorFlow's converter.
* **BatchMatMulV2** of a per-sample left operand with a weight shared by every sample (what ``EinsumDense``, the
  query/key/value/output projections of ``MultiHeadAttention`` and ``Dense`` on sequences become): TensorFlow
  emits a broadcasting batched product of shape ``(n, 1, T, D) × (D, E)`` (n samples, each carrying the batch
  dimension of 1 that the per-sample function adds). With oneDNN enabled (the default of TensorFlow's CPU builds)
  that op corrupts memory and kills the interpreter with a segmentation fault (measured on TensorFlow 2.21:
  ``(4, 1, 64, 64) × (64, 64)`` in a graph crashes; ``(4, 2, 64, 64)``, ``(1, 4, 64, 64)`` and eager mode do
  not). Here the per-sample rows are folded into the matrix rows instead, ``(n·1·T, D) × (D, E)``: one plain
  ``MatMul`` when the shared operand is a matrix, a batched product without the broadcast dimension otherwise.
  Products of two per-sample operands keep TensorFlow's converter (their batch dimensions match, no broadcast).

This relies on TensorFlow's private pfor converter registry; if that registry is not found, nothing is changed.
"""
import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, Optional

import tensorflow as tf

try:  # private TensorFlow API: used only if present, in the form checked below
    from tensorflow.python.ops.parallel_for import pfor as _pfor  # pylint: disable=no-name-in-module
except ImportError:  # pragma: no cover - depends on the TensorFlow build
    _pfor = None


def _patches_filter_gradients(pfor_input: Any) -> Optional[Any]:
    """Per-sample filter gradients of a 2-D convolution from image patches, or None when not applicable."""
    inputs, inputs_stacked, _ = pfor_input.input(0)
    if not inputs_stacked or pfor_input.get_attr("data_format") not in (b"NHWC", "NHWC"):
        return None
    padding = pfor_input.get_attr("padding")
    padding = padding.decode() if isinstance(padding, bytes) else padding
    filter_sizes = tf.get_static_value(pfor_input.unstacked_input(1))
    if padding not in ("SAME", "VALID") or filter_sizes is None:
        return None
    kernel_height, kernel_width, in_channels, out_channels = (int(size) for size in filter_sizes)
    pfor_input.stack_inputs(stack_indices=[2])
    grads = pfor_input.stacked_input(2)  # (n, b, H', W', out_channels)
    count = tf.reshape(pfor_input.pfor.loop_len_vector, [])
    images = tf.reshape(inputs, tf.concat([[-1], tf.shape(inputs)[2:]], axis=0))  # (n·b, H, W, in_channels)
    patches = tf.image.extract_patches(images, sizes=[1, kernel_height, kernel_width, 1],
                                       strides=list(pfor_input.get_attr("strides")),
                                       rates=list(pfor_input.get_attr("dilations")), padding=padding)
    patch_size = kernel_height * kernel_width * in_channels
    patches = tf.reshape(patches, tf.stack([count, -1, patch_size]))
    grads = tf.reshape(grads, tf.stack([count, -1, out_channels]))
    filters = tf.matmul(patches, grads, transpose_a=True)  # (n, kh·kw·in, out)
    filters = tf.reshape(filters, tf.stack([count, kernel_height, kernel_width, in_channels, out_channels]))
    return _pfor.wrap(filters, True)


def _per_sample_rows_times_shared(pfor_input: Any) -> Optional[Any]:
    """``x_i @ y`` for a per-sample x (n, *bx, M, K) and a shared y (*by, K, N), with the n samples folded into
    the rows M (no broadcast over the per-sample dimension); None when x is shared or y is per-sample."""
    left, left_stacked, _ = pfor_input.input(0)
    right, right_stacked, _ = pfor_input.input(1)
    if not left_stacked or right_stacked or left.shape.rank is None or right.shape.rank is None:
        return None
    if pfor_input.get_attr("adj_x"):
        left = tf.linalg.adjoint(left)
    adjoint_right = bool(pfor_input.get_attr("adj_y"))
    left_shape = tf.shape(left)
    if right.shape.rank == 2:  # a weight matrix: one plain MatMul over every row of every sample
        rows = tf.reshape(left, tf.stack([-1, left_shape[-1]]))
        product = tf.matmul(rows, right, adjoint_b=adjoint_right)
        columns = tf.shape(product)[-1:]
        return _pfor.wrap(tf.reshape(product, tf.concat([left_shape[:-1], columns], axis=0)), True)
    rank = left.shape.rank  # 1 (samples) + batch dimensions + 2
    to_rows = list(range(1, rank - 2)) + [0, rank - 2, rank - 1]  # (*bx, n, M, K)
    folded = tf.transpose(left, to_rows)
    folded = tf.reshape(folded, tf.concat([tf.shape(folded)[:-3], [-1], left_shape[-1:]], axis=0))
    product = tf.matmul(folded, right, adjoint_b=adjoint_right)  # (*b, n·M, N)
    product_shape = tf.shape(product)
    product = tf.reshape(product, tf.concat([product_shape[:-2], left_shape[:1], left_shape[-2:-1],
                                             product_shape[-1:]], axis=0))  # (*b, n, M, N)
    out_rank = product.shape.rank
    to_samples_first = [out_rank - 3] + list(range(out_rank - 3)) + [out_rank - 2, out_rank - 1]
    return _pfor.wrap(tf.transpose(product, to_samples_first), True)


_CONVERTERS: Dict[str, Callable[[Any], Optional[Any]]] = {
    "Conv2DBackpropFilter": _patches_filter_gradients,
    "BatchMatMulV2": _per_sample_rows_times_shared,
    "BatchMatMul": _per_sample_rows_times_shared,
}


def _with_fallback(ours: Callable[[Any], Optional[Any]], original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def converter(pfor_input: Any) -> Any:
        converted = ours(pfor_input)
        return converted if converted is not None else original(pfor_input)

    return converter


@contextlib.contextmanager
def per_sample_converters() -> Iterator[None]:
    """Within the block, trace ``vectorized_map`` with the converters of this module (then restore TensorFlow's)."""
    registry = getattr(_pfor, "_pfor_converter_registry", None)
    if not isinstance(registry, dict) or not hasattr(_pfor, "wrap"):
        yield
        return
    originals = {name: registry.get(name) for name in _CONVERTERS}
    for name, ours in _CONVERTERS.items():
        if originals[name] is not None:
            registry[name] = _with_fallback(ours, originals[name])
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is not None:
                registry[name] = original


def vectorized_per_sample(function: Callable[[Any], tf.Tensor], elements: Any, what: str = "Per-sample gradients"
                          ) -> tf.Tensor:
    """``tf.vectorized_map(function, elements)`` over the batch with the library's converters; when pfor cannot
    convert an op (found while tracing), a while loop for those ops, with a ``RuntimeWarning`` naming ``what``."""
    try:
        with per_sample_converters():
            return tf.vectorized_map(function, elements, fallback_to_while_loop=False)
    except (ValueError, NotImplementedError, TypeError) as error:
        warnings.warn(f"{what} could not be fully vectorized ({type(error).__name__}: {str(error)[:200]}); falling "
                      "back to a slower while loop for the unsupported ops.", RuntimeWarning, stacklevel=3)
        return tf.vectorized_map(function, elements, fallback_to_while_loop=True)
