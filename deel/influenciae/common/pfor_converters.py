"""Faster vectorization of per-sample convolution gradients.

TensorFlow's ``vectorized_map`` (pfor) converts the filter gradient of a convolution whose input differs per
iteration (``Conv2DBackpropFilter`` with a stacked input, exactly the per-sample-gradient case) into a sequential
``while_loop`` over the samples (it logs "Conv2DBackpropFilter uses a while_loop. Fix that!"). Here the per-sample
filter gradients are computed instead as one batched product of image patches with output gradients:
``dW_i[kh, kw, c, o] = Σ_{h, w} patch_i[h, w, (kh, kw, c)] · dy_i[h, w, o]``. The replacement is installed only
while our per-sample-gradient kernels are traced (:func:`per_sample_converters`), and falls back to TensorFlow's
converter for the cases it does not cover (NCHW, explicit padding, unknown filter size, unstacked input).

This relies on TensorFlow's private pfor converter registry; if that registry is not found, nothing is changed.
"""
import contextlib
from typing import Any, Iterator, Optional

import tensorflow as tf

try:  # private TensorFlow API: used only if present, in the form checked below
    from tensorflow.python.ops.parallel_for import pfor as _pfor  # pylint: disable=no-name-in-module
except ImportError:  # pragma: no cover - depends on the TensorFlow build
    _pfor = None

_OP = "Conv2DBackpropFilter"


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


@contextlib.contextmanager
def per_sample_converters() -> Iterator[None]:
    """Within the block, trace ``vectorized_map`` with the patch-based per-sample convolution filter gradient."""
    registry = getattr(_pfor, "_pfor_converter_registry", None)
    original = registry.get(_OP) if isinstance(registry, dict) else None
    if original is None or not hasattr(_pfor, "wrap"):
        yield
        return

    def converter(pfor_input: Any) -> Any:
        converted = _patches_filter_gradients(pfor_input)
        return converted if converted is not None else original(pfor_input)

    registry[_OP] = converter
    try:
        yield
    finally:
        registry[_OP] = original
