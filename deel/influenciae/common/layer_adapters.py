"""How a kind of layer gives the per-sample gradients of its weights in factored form: layer adapters.

While the per-sample kernel is traced, the ``call`` of each watched layer that has an adapter is replaced, on the
instance, by :meth:`LayerAdapter.forward`: the adapter recomputes the layer's pre-activation output ``z`` from the
layer's inputs and weights, adds a zero *probe* shaped like ``z`` and applies the activation. The gradient of the
summed loss with respect to the probe is ``∂ℓ_i/∂z_i`` for every sample at once (samples are independent in
inference mode); :meth:`LayerAdapter.factors` turns it and the layer's input into the factors of
:class:`~deel.influenciae.common.layer_factors.LayerFactors`.

Built-in adapters: ``Dense``, ``EinsumDense`` (the projections of ``MultiHeadAttention`` are ``EinsumDense``),
``Conv2D``, ``Embedding``, and closed forms for ``LayerNormalization`` and ``BatchNormalization`` (inference mode:
``∂ℓ/∂γ = Σ_p δ ∘ x̂`` and ``∂ℓ/∂β = Σ_p δ``, with ``x̂`` the normalised input). Others are added with
:func:`register_layer_adapter`. An adapter refuses (``ValueError`` naming the layer, from :meth:`LayerAdapter.check`)
what it cannot reproduce exactly; such a layer's weights then get materialised per-sample gradients.
"""
import abc
import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import keras
import numpy as np
import tensorflow as tf

from .conv_moments import stride_one_patch_moments

Probe = Callable[[tf.Tensor], tf.Tensor]


RowMoments = Callable[[tf.DType], Tuple[tf.Tensor, tf.Tensor]]


class CallFactors(NamedTuple):
    """What one call of a layer contributes to its per-sample gradients.

    Attributes
    ----------
    inputs
        Rows ``a``: (B, T, in) floats or (B, T) integer token ids; None for a layer without kernel.
    output_gradients
        ``δ``: (B, T, out); None for a layer without kernel.
    closed_forms
        Per-sample gradients (B, *shape) of the weights of :meth:`LayerAdapter.weights`, in that order; None in
        the kernel's place.
    row_moments
        Optional ``dtype -> (Σ a aᵀ (in, in), Σ a (in,))`` over the batch and positions, computed without the rows
        (a convolution's from its input: :mod:`.conv_moments`); None when only the rows give them.
    row_windows
        Optional ``() -> [(B, T, C)]``: the rows as blocks of columns whose concatenation is ``inputs`` (a
        convolution's input windows, one per kernel offset), so that products with the rows need not form them.
    """

    inputs: Optional[tf.Tensor]
    output_gradients: Optional[tf.Tensor]
    closed_forms: Tuple[Optional[tf.Tensor], ...]
    row_moments: Optional[RowMoments] = None
    row_windows: Optional[Callable[[], List[tf.Tensor]]] = None


class LayerAdapter(abc.ABC):
    """Recomputes one kind of layer with a probe on its pre-activation output and factors its per-sample gradients.

    The kernel ``W`` (if any) must enter the layer as ``z_{i,p} = a_{i,p} W`` (W flattened to (in, out) by
    :meth:`kernel_layout`'s inverse) so that its per-sample gradient is ``Σ_p a_{i,p} δ_{i,p}ᵀ``; every other weight
    gets a closed-form per-sample gradient from :meth:`factors`.
    """

    def check(self, layer: keras.layers.Layer) -> None:  # pylint: disable=unused-argument
        """Raise ``ValueError`` naming the layer when :meth:`forward` cannot reproduce it exactly."""
        return None

    @abc.abstractmethod
    def weights(self, layer: keras.layers.Layer) -> List[Any]:
        """The weights of the layer this adapter gives per-sample gradients of (the kernel first)."""

    def kernel(self, layer: keras.layers.Layer) -> Optional[Any]:  # pylint: disable=unused-argument
        """The weight whose per-sample gradient is ``Σ_p a δᵀ``, or None when every weight has a closed form."""
        return None

    def vocabulary(self, layer: keras.layers.Layer) -> Optional[int]:  # pylint: disable=unused-argument
        """The number of token ids when the rows ``a`` are one-hot tokens (given as ids), else None."""
        return None

    def kernel_layout(self, layer: keras.layers.Layer, gradients: tf.Tensor) -> tf.Tensor:
        """(B, in, out) kernel gradients laid out like the kernel: (B, *kernel.shape); row-major by default."""
        shape = [int(size) for size in self.kernel(layer).shape]
        return tf.reshape(gradients, tf.concat([tf.shape(gradients)[:1], shape], axis=0))

    @abc.abstractmethod
    def forward(self, layer: keras.layers.Layer, probe: Probe, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """The layer's output recomputed from ``inputs`` and its weights, its pre-activation ``z`` replaced by
        ``probe(z)`` (exactly once per call); ``args`` and ``kwargs`` are those the layer was called with."""

    @abc.abstractmethod
    def factors(self, layer: keras.layers.Layer, inputs: Any, gradients: tf.Tensor) -> CallFactors:
        """The factors of one call from the layer's input (B, ...) and ``∂ℓ_i/∂z`` (B, *z.shape[1:])."""


_ADAPTERS: Dict[type, LayerAdapter] = {}


def register_layer_adapter(layer_class: Type[keras.layers.Layer], adapter: LayerAdapter) -> None:
    """Use ``adapter`` for the layers that are instances of ``layer_class`` (the most derived registered class of
    a layer wins; registering a class again replaces its adapter).

    Raises
    ------
    TypeError
        ``layer_class`` is not a Keras layer class, or ``adapter`` is not a :class:`LayerAdapter`.
    """
    if not isinstance(layer_class, type) or not issubclass(layer_class, keras.layers.Layer):
        raise TypeError(f"layer_class must be a subclass of keras.layers.Layer, got {layer_class!r}.")
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a LayerAdapter instance, got {type(adapter).__name__}.")
    _ADAPTERS[layer_class] = adapter


def layer_adapter(layer: keras.layers.Layer) -> Optional[LayerAdapter]:
    """The adapter registered for the most derived class ``layer`` is an instance of, or None."""
    for cls in type(layer).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


# Helpers -------------------------------------------------------------------------------------------------------------
def refuse(layer: keras.layers.Layer, reason: str) -> None:
    """Raise the ``ValueError`` of an adapter that cannot reproduce ``layer``."""
    raise ValueError(f"{type(layer).__name__} layer {layer.name!r} cannot be factored exactly: {reason}; its watched "
                     "weights get materialised per-sample gradients instead.")


def _require(layer: keras.layers.Layer, base: type, methods: Sequence[str] = ("call",)) -> None:
    """Built-in adapters reproduce ``base``'s own computation: no LoRA, no quantization, no overridden method."""
    for method in methods:
        if getattr(type(layer), method) is not getattr(base, method):
            refuse(layer, f"it overrides {base.__name__}.{method}")
    if getattr(layer, "lora_enabled", False):
        refuse(layer, "LoRA is enabled")
    if getattr(layer, "quantization_mode", None) is not None:
        refuse(layer, f"it is quantized ({layer.quantization_mode})")


def static_positions(tensor: tf.Tensor, width: int = 1) -> Optional[int]:
    """T, the number of rows of ``width`` values per sample of a (B, ...) tensor, when its sizes after the batch's
    are static; else None."""
    sizes = tensor.shape[1:]
    if sizes.rank is None or None in sizes.as_list():
        return None
    return int(np.prod(sizes.as_list(), dtype=np.int64)) // width


def _per_sample(tensor: tf.Tensor, trailing: Sequence[int]) -> tf.Tensor:
    """(B, ...) -> (B, T, *trailing), the positions of a sample contiguous (row-major). T stays static when the
    sizes after the batch's are (the choices between product forms read it), also under a trace for any batch
    size."""
    positions = static_positions(tensor, int(np.prod(trailing, dtype=np.int64)))
    return tf.reshape(tensor, tf.stack([tf.shape(tensor)[0], -1 if positions is None else positions, *trailing]))


def _rows(tensor: tf.Tensor, width: int) -> tf.Tensor:
    """(B, ..., width) -> (B, T, width) (see :func:`_per_sample`)."""
    return _per_sample(tensor, [width])


def sum_to_shape(gradients: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """Per-sample gradients (B, *z) summed over the axes a weight of ``shape`` is broadcast along when added to
    ``z`` (trailing alignment): (B, *shape)."""
    shape = [int(size) for size in shape]
    rank = gradients.shape.rank - 1
    padded = [1] * (rank - len(shape)) + shape
    axes = [axis + 1 for axis, size in enumerate(padded) if size == 1]
    if axes:
        gradients = tf.reduce_sum(gradients, axis=axes, keepdims=True)
    return tf.reshape(gradients, tf.concat([tf.shape(gradients)[:1], shape], axis=0))


def _activate(layer: keras.layers.Layer, outputs: tf.Tensor) -> tf.Tensor:
    return outputs if layer.activation is None else layer.activation(outputs)


def _bias_closed_form(layer: keras.layers.Layer, gradients: tf.Tensor) -> Tuple[Optional[tf.Tensor], ...]:
    """(None for the kernel, the bias's per-sample gradients) or (None,) without bias."""
    if layer.bias is None:
        return (None,)
    return None, sum_to_shape(gradients, layer.bias.shape)


class _KernelBiasAdapter(LayerAdapter):  # pylint: disable=abstract-method
    """A layer with a ``kernel`` and an optional ``bias``."""

    def weights(self, layer: keras.layers.Layer) -> List[Any]:
        return [layer.kernel] + ([] if layer.bias is None else [layer.bias])

    def kernel(self, layer: keras.layers.Layer) -> Optional[Any]:
        return layer.kernel


# Dense -------------------------------------------------------------------------------------------------------------
class DenseAdapter(_KernelBiasAdapter):
    """``keras.layers.Dense``: ``z = x W + b`` on features (T = 1) or on sequences (T = every leading position)."""

    def check(self, layer: keras.layers.Layer) -> None:
        _require(layer, keras.layers.Dense)

    def forward(self, layer: keras.layers.Layer, probe: Probe, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = keras.ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            outputs = keras.ops.add(outputs, layer.bias)
        return _activate(layer, probe(outputs))

    def factors(self, layer: keras.layers.Layer, inputs: Any, gradients: tf.Tensor) -> CallFactors:
        in_size, out_size = (int(size) for size in layer.kernel.shape)
        return CallFactors(_rows(inputs, in_size), _rows(gradients, out_size), _bias_closed_form(layer, gradients))


# EinsumDense -------------------------------------------------------------------------------------------------------
class _EinsumRoles(NamedTuple):
    """The letters of an ``EinsumDense`` equation by role (the ellipsis expanded when the rank is known)."""

    inputs: str
    kernel: str
    outputs: str
    positions: str  # in the input and the output (the batch letter excluded), in input order
    contracted: str  # in the input and the kernel, in kernel order
    free: str  # in the kernel and the output, in kernel order


def _einsum_roles(layer: keras.layers.Layer, rank: Optional[int] = None) -> _EinsumRoles:
    """The roles of the letters of ``layer.equation``; refuses equations that are not ``z_p = a_p W`` per sample."""
    left, outputs = layer.equation.replace(" ", "").split("->")
    inputs, kernel = left.split(",")
    if "..." in kernel:
        refuse(layer, "its kernel has an ellipsis")
    batch_known = rank is not None or not inputs.startswith("...")
    if "..." in inputs:
        unused = [letter for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if letter not in layer.equation]
        elided = "".join(unused[:max(rank - len(inputs.replace("...", "")), 0)]) if rank is not None else ""
        inputs, outputs = inputs.replace("...", elided), outputs.replace("...", elided)
    for spec in (inputs, kernel, outputs):
        if len(set(spec)) != len(spec):
            refuse(layer, f"a letter repeats in {spec!r}")
    for letter in inputs + kernel:
        if letter in inputs and letter in kernel and letter in outputs:
            refuse(layer, f"{letter!r} is in the input, the kernel and the output")
        if (letter in inputs) + (letter in kernel) + (letter in outputs) < 2:
            refuse(layer, f"{letter!r} is summed over within one operand")
    if batch_known and (not inputs or inputs[0] in kernel):  # an elided batch letter is known with the rank only
        refuse(layer, "the batch letter (first input letter) reaches the kernel")
    return _EinsumRoles(inputs, kernel, outputs,
                        positions="".join(letter for letter in inputs[1:] if letter in outputs),
                        contracted="".join(letter for letter in kernel if letter in inputs),
                        free="".join(letter for letter in kernel if letter in outputs))


class EinsumDenseAdapter(_KernelBiasAdapter):
    """``keras.layers.EinsumDense`` whose equation is a matrix product per sample and position: every input letter
    but the batch's is either contracted with the kernel or a position carried to the output."""

    def check(self, layer: keras.layers.Layer) -> None:
        _require(layer, keras.layers.EinsumDense)
        _einsum_roles(layer)

    def forward(self, layer: keras.layers.Layer, probe: Probe, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = keras.ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            outputs = keras.ops.add(outputs, layer.bias)
        return _activate(layer, probe(outputs))

    def factors(self, layer: keras.layers.Layer, inputs: Any, gradients: tf.Tensor) -> CallFactors:
        roles = _einsum_roles(layer, inputs.shape.rank)
        sizes = dict(zip(roles.kernel, (int(size) for size in layer.kernel.shape)))
        rows = tf.transpose(inputs, [roles.inputs.index(letter) for letter in roles.inputs[0] + roles.positions
                                     + roles.contracted])
        deltas = tf.transpose(gradients, [roles.outputs.index(letter) for letter in roles.inputs[0] + roles.positions
                                          + roles.free])
        return CallFactors(_rows(rows, int(np.prod([sizes[letter] for letter in roles.contracted]))),
                           _rows(deltas, int(np.prod([sizes[letter] for letter in roles.free]))),
                           _bias_closed_form(layer, gradients))

    def kernel_layout(self, layer: keras.layers.Layer, gradients: tf.Tensor) -> tf.Tensor:
        roles = _einsum_roles(layer)
        sizes = dict(zip(roles.kernel, (int(size) for size in layer.kernel.shape)))
        order = roles.contracted + roles.free
        split = tf.reshape(gradients, tf.concat([tf.shape(gradients)[:1], [sizes[letter] for letter in order]], 0))
        return tf.transpose(split, [0] + [order.index(letter) + 1 for letter in roles.kernel])


# Conv2D ------------------------------------------------------------------------------------------------------------
class Conv2DAdapter(_KernelBiasAdapter):
    """``keras.layers.Conv2D`` (channels last, one group): rows are the image patches, one per output position."""

    def check(self, layer: keras.layers.Layer) -> None:
        _require(layer, keras.layers.Conv2D, ("call", "convolution_op"))
        if layer.groups != 1:
            refuse(layer, f"groups={layer.groups} (only 1 is supported)")
        if layer.data_format != "channels_last":
            refuse(layer, f"data_format={layer.data_format!r} (only 'channels_last' is supported)")
        if layer.padding not in ("valid", "same"):
            refuse(layer, f"padding={layer.padding!r}")

    def forward(self, layer: keras.layers.Layer, probe: Probe, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = layer.convolution_op(inputs, layer.kernel)
        if layer.bias is not None:
            outputs = keras.ops.add(outputs, keras.ops.reshape(layer.bias, (1, 1, 1, layer.filters)))
        return _activate(layer, probe(outputs))

    def factors(self, layer: keras.layers.Layer, inputs: Any, gradients: tf.Tensor) -> CallFactors:
        height, width, channels, filters = (int(size) for size in layer.kernel.shape)
        moments = None
        if _has_shifted_moments(layer, inputs, gradients):
            moments = functools.partial(stride_one_patch_moments, inputs, (height, width), layer.padding)
        windows = patch_windows(layer, inputs)
        flat_windows = None if windows is None else functools.partial(_flat_windows, windows, channels)
        return CallFactors(_rows(image_patches(layer, inputs, windows), height * width * channels),
                           _rows(gradients, filters), _bias_closed_form(layer, gradients), moments, flat_windows)


# Below this many output positions the patches' product is as fast and traces in far fewer operations.
SHIFTED_MOMENTS_MIN_POSITIONS = 256


def _flat_windows(windows: Sequence[tf.Tensor], channels: int) -> List[tf.Tensor]:
    """Each (B, H_o, W_o, C) window as (B, T, C) rows."""
    return [_rows(window, channels) for window in windows]


def _has_shifted_moments(layer: keras.layers.Layer, inputs: tf.Tensor, gradients: tf.Tensor) -> bool:
    """Whether :func:`.stride_one_patch_moments` applies and pays: stride 1, no dilation, static sizes, output sizes
    at least the kernel's size - 1 (the edge bands of its windows do not overlap) and at least
    ``SHIFTED_MOMENTS_MIN_POSITIONS`` output positions (16 × 16)."""
    if tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1):
        return False
    outputs = gradients.shape[1:3]
    if None in inputs.shape[1:] or None in outputs or outputs[0] * outputs[1] < SHIFTED_MOMENTS_MIN_POSITIONS:
        return False
    return all(count >= int(kernel) - 1 for count, kernel in zip(outputs, layer.kernel.shape[:2]))


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int, int]:
    """(before, after, outputs) of TensorFlow's "SAME" padding along one axis."""
    outputs = -(-size // stride)
    total = max((outputs - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2, outputs


def patch_windows(layer: keras.layers.Layer, inputs: tf.Tensor) -> Optional[List[tf.Tensor]]:
    """The patches of a channels-last ``Conv2D`` call as one window of the (padded) input per kernel offset, in the
    row-major order of the kernel's first axes: ``kh · kw`` tensors (B, out_height, out_width, C) whose concatenation
    along channels is :func:`image_patches`; None when the input's spatial sizes are not static."""
    kernel_size, strides, dilation = layer.kernel.shape[:2], layer.strides, layer.dilation_rate
    sizes = inputs.shape[1:3]
    if None in sizes:
        return None
    paddings, outputs = [[0, 0]], []
    for size, kernel, stride, rate in zip(sizes, kernel_size, strides, dilation):
        if layer.padding == "same":
            before, after, count = _same_padding(int(size), int(kernel), stride, rate)
        else:
            before, after, count = 0, 0, (int(size) - (int(kernel) - 1) * rate - 1) // stride + 1
        paddings.append([before, after])
        outputs.append(count)
    padded = tf.pad(inputs, paddings + [[0, 0]]) if any(sum(pair) for pair in paddings) else inputs
    return [padded[:, row * dilation[0]:row * dilation[0] + (outputs[0] - 1) * strides[0] + 1:strides[0],
                   column * dilation[1]:column * dilation[1] + (outputs[1] - 1) * strides[1] + 1:strides[1], :]
            for row in range(int(kernel_size[0])) for column in range(int(kernel_size[1]))]


def image_patches(layer: keras.layers.Layer, inputs: tf.Tensor,
                  windows: Optional[List[tf.Tensor]] = None) -> tf.Tensor:
    """The patches of a channels-last ``Conv2D`` call: (B, out_height, out_width, kh · kw · C), each flattened as
    (kh, kw, C), the row-major order of the kernel's first axes. With static spatial sizes they are the
    :func:`patch_windows` (given or computed), concatenated (1.5-3x faster than ``tf.image.extract_patches`` on
    CPUs, same values)."""
    windows = patch_windows(layer, inputs) if windows is None else windows
    if windows is None:
        return tf.image.extract_patches(inputs, sizes=[1, *layer.kernel.shape[:2], 1],
                                        strides=[1, *layer.strides, 1], rates=[1, *layer.dilation_rate, 1],
                                        padding=layer.padding.upper())
    return windows[0] if len(windows) == 1 else tf.concat(windows, axis=-1)

# Embedding ---------------------------------------------------------------------------------------------------------
class EmbeddingAdapter(LayerAdapter):
    """``keras.layers.Embedding``: the row of token t is ``onehot(t) E``; rows are kept as token ids."""

    def check(self, layer: keras.layers.Layer) -> None:
        _require(layer, keras.layers.Embedding)

    def weights(self, layer: keras.layers.Layer) -> List[Any]:
        return [layer.embeddings]

    def kernel(self, layer: keras.layers.Layer) -> Optional[Any]:
        return layer.embeddings

    def vocabulary(self, layer: keras.layers.Layer) -> Optional[int]:
        return int(layer.input_dim)

    def forward(self, layer: keras.layers.Layer, probe: Probe, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if inputs.dtype not in ("int32", "int64", tf.int32, tf.int64):
            inputs = keras.ops.cast(inputs, "int32")
        outputs = keras.ops.cast(keras.ops.take(layer.embeddings, inputs, axis=0), layer.compute_dtype)
        return probe(outputs)

    def factors(self, layer: keras.layers.Layer, inputs: Any, gradients: tf.Tensor) -> CallFactors:
        return CallFactors(_per_sample(tf.cast(inputs, tf.int32), []), _rows(gradients, int(layer.output_dim)), (None,))


# Normalisations ----------------------------------------------------------------------------------------------------
def _features(tensor: tf.Tensor, axes: Sequence[int], width: int) -> tf.Tensor:
    """(B, ...) with the normalised ``axes`` moved last (in order) and the others folded: (B, T, width)."""
    rank = tensor.shape.rank
    order = [0] + [axis for axis in range(1, rank) if axis not in axes] + list(axes)
    if order != list(range(rank)):
        tensor = tf.transpose(tensor, order)
    return _rows(tensor, width)


def _scale_offset_forms(layer: keras.layers.Layer, normalised: tf.Tensor, deltas: tf.Tensor,
                        scale_form: Optional[Callable[[], tf.Tensor]] = None) -> CallFactors:
    """γ: ``Σ_p δ ∘ x̂`` (or ``scale_form()``), β: ``Σ_p δ`` (B, *shape), for the scale and offset the layer has."""
    forms = []
    scale_form = scale_form or (lambda: tf.reduce_sum(deltas * normalised, axis=1))
    for weight, summed in ((layer.gamma, scale_form), (layer.beta, lambda: tf.reduce_sum(deltas, axis=1))):
        if weight is not None:
            forms.append(tf.reshape(summed(), tf.concat([tf.shape(deltas)[:1], [int(s) for s in weight.shape]], 0)))
    return CallFactors(normalised, deltas, tuple(forms))


def _gamma_beta(layer: keras.layers.Layer) -> List[Any]:
    return [weight for weight in (layer.gamma, layer.beta) if weight is not None]


class LayerNormalizationAdapter(LayerAdapter):
    """``keras.layers.LayerNormalization``: ``y = x̂ ∘ γ + β`` per sample (no activation, so ``z`` is the output)."""

    def check(self, layer: keras.layers.Layer) -> None:
        _require(layer, keras.layers.LayerNormalization)
        if getattr(layer, "rms_scaling", False):
            refuse(layer, "rms_scaling=True")
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        if min(axes) < 0 < max(axes) or axes != sorted(axes):
            refuse(layer, f"axis={layer.axis} mixes signs or is not increasing")

    def weights(self, layer: keras.layers.Layer) -> List[Any]:
        return _gamma_beta(layer)

    def forward(self, layer: keras.layers.Layer, probe: Probe, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        return probe(keras.layers.LayerNormalization.call(layer, inputs, *args, **kwargs))

    def factors(self, layer: keras.layers.Layer, inputs: Any, gradients: tf.Tensor) -> CallFactors:
        rank = inputs.shape.rank
        axes = sorted(axis % rank for axis in ([layer.axis] if isinstance(layer.axis, int) else layer.axis))
        values = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = keras.ops.moments(values, axes=axes, keepdims=True)
        normalised = (values - mean) * keras.ops.rsqrt(variance + layer.epsilon)
        width = int(np.prod([inputs.shape[axis] for axis in axes]))
        return _scale_offset_forms(layer, _features(normalised, axes, width), _features(gradients, axes, width))


class BatchNormalizationAdapter(LayerAdapter):
    """``keras.layers.BatchNormalization`` in inference mode: ``y = (x - μ) / √(σ² + ε) ∘ γ + β`` with the moving
    statistics μ, σ² (no activation, so ``z`` is the output)."""

    def check(self, layer: keras.layers.Layer) -> None:
        _require(layer, keras.layers.BatchNormalization)
        if not isinstance(layer.axis, int):
            refuse(layer, f"axis={layer.axis} (one axis is supported)")

    def weights(self, layer: keras.layers.Layer) -> List[Any]:
        return _gamma_beta(layer)

    def forward(self, layer: keras.layers.Layer, probe: Probe, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["training"] = False  # the library evaluates in inference mode: the moving statistics are used
        return probe(keras.layers.BatchNormalization.call(layer, inputs, *args, **kwargs))

    def factors(self, layer: keras.layers.Layer, inputs: Any, gradients: tf.Tensor) -> CallFactors:
        axis = layer.axis % inputs.shape.rank
        width = int(inputs.shape[axis])
        values = _features(tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32")), [axis], width)
        deltas = _features(gradients, [axis], width)
        mean = tf.cast(layer.moving_mean, values.dtype)
        inverse = keras.ops.rsqrt(tf.cast(layer.moving_variance, values.dtype) + layer.epsilon)
        # Σ_p δ ∘ x̂ = (Σ_p δ ∘ x - μ Σ_p δ) / √(σ² + ε): one product over the activations instead of three.
        return _scale_offset_forms(layer, (values - mean) * inverse, deltas, lambda: inverse * (
            tf.reduce_sum(deltas * values, axis=1) - mean * tf.reduce_sum(deltas, axis=1)))


for _class, _adapter in ((keras.layers.Dense, DenseAdapter()), (keras.layers.EinsumDense, EinsumDenseAdapter()),
                         (keras.layers.Conv2D, Conv2DAdapter()), (keras.layers.Embedding, EmbeddingAdapter()),
                         (keras.layers.LayerNormalization, LayerNormalizationAdapter()),
                         (keras.layers.BatchNormalization, BatchNormalizationAdapter())):
    register_layer_adapter(_class, _adapter)
