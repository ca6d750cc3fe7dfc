"""Wrappers that tell which weights of a Keras model are watched and give per-sample derivatives."""
import functools
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from ..utils.batch_checks import batch_origin, check_finite_batch
from ..utils.tf_operations import assert_batched_dataset, default_process_batch, from_layer_name_to_layer_idx
from .autodiff import LossKernels
from .compat import loss_given_as_last_layer
from .distribution import resolve_strategy
from .executor import EmptyDatasetError, Executor
from .factor_kernels import LayerFactorKernels

ProcessBatchTypeAlias = Callable[[Tuple], Tuple[Any, Any, Optional[tf.Tensor]]]

_UNREDUCED = (None, "none")


def _default_loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=False, reduction=None)


def check_unreduced_loss(loss_function: Callable, name: str = "loss_function") -> None:
    """Raise unless ``loss_function`` is a callable that returns one loss per sample.

    Keras losses must have ``reduction=None`` or ``"none"`` (``"sum"``, ``"sum_over_batch_size"`` and
    ``"mean"`` reduce over the batch and are rejected). Plain callables are accepted as they are.
    """
    if not callable(loss_function):
        raise TypeError(f"{name} must be callable, got {type(loss_function).__name__}.")
    reduction = getattr(loss_function, "reduction", None)
    reduction = getattr(reduction, "value", reduction)
    if isinstance(reduction, str):
        reduction = reduction.lower()
    if reduction not in _UNREDUCED:
        raise ValueError(f"The loss function must not have reduction: {name} reduces with {reduction!r} over the "
                         "batch; build it with reduction=None (or 'none') so it returns one loss per sample.")


class BaseInfluenceModel:
    """A Keras model, its per-sample loss and the weights whose influence is measured.

    Parameters
    ----------
    model
        A built Keras 3 model (Sequential, Functional or subclassed).
    weights_to_watch
        The watched variables: a list of variables, or of lists of variables (one per layer) unless
        ``weights_processed`` is True. Defaults to every trainable weight of the model.
    loss_function
        Per-sample loss ``f(y_true, y_pred[, sample_weight]) -> (B,)``; Keras losses must be built with
        ``reduction=None``. Defaults to ``CategoricalCrossentropy(from_logits=False, reduction=None)``.
    process_batch_for_loss_fn
        Maps a dataset element to ``(inputs, targets, sample_weight or None)``; by default ``(x, y)`` or
        ``(x, y, sample_weight)``.
    weights_processed
        True when ``weights_to_watch`` is already a flat list of variables.
    strategy
        The ``tf.distribute.Strategy`` every pass over data of this model (and of the calculators built on it)
        runs under: each batch is split across its replicas. Default: the strategy whose ``scope()`` is open when
        the influence model is built, else None (one device).

    Attributes
    ----------
    weights : list
        The watched variables, in order; gradients are flattened row-major and concatenated in this order.
    nb_params : int
        P, the number of watched parameters.
    strategy : tf.distribute.Strategy or None
        The strategy the passes over data run under.
    """

    def __init__(self, model: keras.Model, weights_to_watch: Optional[Sequence[Any]] = None,
                 loss_function: Optional[Callable] = None,
                 process_batch_for_loss_fn: ProcessBatchTypeAlias = default_process_batch,
                 weights_processed: bool = False, strategy: Optional[tf.distribute.Strategy] = None):
        self.strategy = resolve_strategy(strategy)
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a Keras 3 model (keras.Model), got {type(model).__name__}.")
        if not model.built:
            raise ValueError("model must be built (start it with keras.Input or call it on data) before wrapping it.")
        loss_function = _default_loss() if loss_function is None else loss_function
        check_unreduced_loss(loss_function)
        if not callable(process_batch_for_loss_fn):
            raise TypeError("process_batch_for_loss_fn must be callable.")
        if weights_to_watch is None:
            weights = list(model.trainable_variables)
        elif weights_processed:
            weights = list(weights_to_watch)
        else:
            weights = [variable for group in weights_to_watch
                       for variable in (group if isinstance(group, (list, tuple)) else [group])]
        if not weights:
            raise ValueError("No weights to watch: the selection holds no trainable weight.")
        self.model = model
        self.weights = weights
        self.loss_function = loss_function
        self.process_batch_for_loss_fn = process_batch_for_loss_fn
        self.kernels = LossKernels(model, weights, loss_function, process_batch_for_loss_fn)
        try:  # the shapes batches must have (None for subclassed models without declared inputs)
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None
        self._input_shapes = [tuple(tensor.shape) for tensor in inputs] if inputs else None
        self.nb_params = self.kernels.nb_params
        self.dtype = self.kernels.dtype
        loss_dtype = getattr(loss_function, "dtype", None)
        if loss_dtype is not None and tf.as_dtype(loss_dtype) != self.dtype:
            warnings.warn(f"loss_function computes in {tf.as_dtype(loss_dtype).name} while the watched weights are "
                          f"{self.dtype.name}: Keras losses cast predictions to their own dtype; build the loss with "
                          f"dtype='{self.dtype.name}' to keep full precision.", stacklevel=2)

    def __call__(self, inputs: Any) -> tf.Tensor:
        """Evaluate the wrapped model."""
        return self.model(inputs)

    @property
    def layers(self) -> List[keras.layers.Layer]:
        """The layers of the wrapped model."""
        return self.model.layers

    @functools.cached_property
    def layer_factors(self) -> LayerFactorKernels:
        """The per-layer factors of the watched weights' per-sample gradients, batch by batch, and their products
        (:class:`~deel.influenciae.common.factor_kernels.LayerFactorKernels`, compiled once per influence model)."""
        return LayerFactorKernels(self.kernels)

    # Batch-level derivatives --------------------------------------------------------------------
    # Every kernel entry checks its batch first (check_batch): a NaN input can vanish inside compiled kernels and
    # a badly shaped input fails deep inside the vectorized graph.
    def batch_loss_tensor(self, batch: Tuple) -> tf.Tensor:
        """Per-sample losses of one batch: (B,)."""
        return self.kernels.per_sample_losses(self.check_batch(batch))

    def batch_jacobian_tensor(self, batch: Tuple) -> tf.Tensor:
        """Per-sample gradients of the loss w.r.t. the watched weights for one batch: (B, P)."""
        return self.kernels.per_sample_gradients(self.check_batch(batch))

    def batch_gradient_tensor(self, batch: Tuple) -> tf.Tensor:
        """Gradient of the batch's summed loss w.r.t. the watched weights: (P,)."""
        return self.kernels.summed_gradient(self.check_batch(batch))

    def batch_hessian_tensor(self, batch: Tuple) -> tf.Tensor:
        """Hessian of the batch's summed loss w.r.t. the watched weights: (P, P)."""
        return self.kernels.summed_hessian(self.check_batch(batch))

    def batch_hvp_tensor(self, batch: Tuple, vectors: tf.Tensor) -> tf.Tensor:
        """Hessian of the batch's summed loss times ``vectors`` (P, K): (P, K)."""
        return self.kernels.summed_hvp(self.check_batch(batch), vectors)

    def check_batch(self, batch: Tuple, name: Optional[str] = None) -> Tuple:
        """Check a batch before it reaches the compiled kernels; return it as a tuple.

        Floating components must be finite (batches yielded by
        :func:`~deel.influenciae.utils.tf_operations.compute_batches` were checked there already) and the
        inputs must match the model's input shapes (``model.inputs``; None is any size).

        Raises
        ------
        ValueError
            Non-finite values (eagerly; in a graph, an assertion fails when the batch is computed), or inputs of
            another shape than the model's, naming the dataset and batch when known.
        """
        batch = tuple(batch)
        origin = batch_origin(batch) if name is None else (name, None)
        where = "the batch" if origin is None else (origin[0] if origin[1] is None else
                                                    f"batch {origin[1]} of {origin[0]}")
        batch = tuple(check_finite_batch(batch, where))
        expected = self._input_shapes
        if expected:
            received = tf.nest.flatten(self.process_batch_for_loss_fn(batch)[0])
            if len(received) == len(expected):
                for position, (tensor, shape) in enumerate(zip(received, expected)):
                    tensor_shape = tf.TensorShape(getattr(tensor, "shape", None))  # tensors and NumPy arrays
                    if tensor_shape.rank is not None and not _input_shape_matches(tuple(tensor_shape), shape):
                        which = "inputs" if len(expected) == 1 else f"input {position}"
                        raise ValueError(
                            f"The {which} of {where} have shape {tuple(tensor_shape)} but the model expects "
                            f"{shape} (model.inputs; None is any size, the first dimension is the batch). Give "
                            "samples shaped like the model's training inputs.")
        return batch

    # Dataset-level helpers (eager) ---------------------------------------------------------------
    def _over_batches(self, dataset: tf.data.Dataset, kernel: Callable, name: str,
                      axis: Optional[int] = 0) -> List[tf.Tensor]:
        """``kernel`` of every batch: per-sample results (rows along ``axis``) or, with ``axis=None``, sums over the
        batch's samples."""
        assert_batched_dataset(dataset, name)
        executor = Executor(strategy=self.strategy)
        results = [executor.apply(kernel, batch, axis) for batch in executor.batches(dataset)]
        if not results:
            raise EmptyDatasetError(f"{name} is empty.")
        return results

    def batch_loss(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-sample losses over a batched dataset: (N,)."""
        return tf.concat(self._over_batches(dataset, self.batch_loss_tensor, "dataset"), axis=0)

    def batch_jacobian(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-sample gradients over a batched dataset: (N, P).

        Raises
        ------
        ValueError
            If a gradient is not finite (NaN or inf).
        """
        gradients = tf.concat(self._over_batches(dataset, self.batch_jacobian_tensor, "dataset"), axis=0)
        assert_finite(gradients, "per-sample gradients")
        return gradients

    def batch_gradient(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Gradients of the summed loss of every batch: (n_batches, P)."""
        gradients = tf.stack(self._over_batches(dataset, self.batch_gradient_tensor, "dataset", None), axis=0)
        assert_finite(gradients, "batch gradients")
        return gradients


def _input_shape_matches(received: tuple, expected: tuple) -> bool:
    """Whether inputs of shape ``received`` fit a model input of shape ``expected`` (Keras 3 also squeezes or adds
    a trailing dimension of size 1)."""
    if len(received) == len(expected) + 1 and received[-1] == 1:
        received = received[:-1]
    elif len(received) + 1 == len(expected) and expected[-1] == 1:
        expected = expected[:-1]
    if len(received) != len(expected):
        return False
    return all(want is None or got is None or int(want) == int(got)
               for want, got in zip(expected[1:], received[1:]))


def non_finite_error(what: str) -> ValueError:
    """The error raised when ``what`` holds NaN or infinite values."""
    return ValueError(f"Non-finite values (NaN or inf) found in the {what}; check the model's weights, the "
                      "inputs and the loss (e.g. log of 0 with from_logits=False).")


def assert_finite(tensor: tf.Tensor, what: str) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or infinite values (eager tensors only)."""
    if not bool(tf.reduce_all(tf.math.is_finite(tensor))):
        raise non_finite_error(what)


def _resolve_index(model: keras.Model, layer: Union[str, int], name: str) -> int:
    """Non-negative index in ``model.layers`` of a layer given by name or (possibly negative) index."""
    count = len(model.layers)
    if isinstance(layer, str):
        return from_layer_name_to_layer_idx(model, layer)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"{name} must be a layer name (str), an index (int) or None, got {type(layer).__name__}.")
    layer = int(layer)
    if not -count <= layer < count:
        raise ValueError(f"{name}={layer} is out of range: the model has {count} layers.")
    return layer + count if layer < 0 else layer


def _last_weighted_layer_before_output(model: keras.Model) -> int:
    """Index of the last layer with weights, scanning backwards from the second-to-last layer."""
    for index in range(len(model.layers) - 2, -1, -1):
        if model.layers[index].weights:
            return index
    raise ValueError("No layers with weights found for the model (the last layer is never picked by default; "
                     "pass start_layer explicitly).")


class InfluenceModel(BaseInfluenceModel):
    """Watch the weights of a contiguous range of layers of a Keras model.

    Layer indices refer to ``model.layers`` (``Sequential.layers`` has no input layer; a Functional model's
    ``layers`` starts with its ``InputLayer``).

    Parameters
    ----------
    model
        A built Keras 3 model.
    start_layer
        First watched layer (name or index, negative allowed). Defaults to the last layer that has weights
        *before* the output layer (the output layer itself is skipped).
    last_layer
        Last watched layer (inclusive; name or index, negative counted from the end). Defaults to watching only
        ``start_layer``.
    loss_function, process_batch_for_loss_fn, strategy
        See :class:`BaseInfluenceModel`. A callable given as third positional argument (``last_layer``) while
        ``loss_function`` is not given is taken as the loss, as in the reference's README
        (``InfluenceModel(model, start_layer, loss)``), with a ``DeprecationWarning``: pass ``loss_function=``.

    Raises
    ------
    ValueError
        Unknown layer name or index, ``last_layer`` before ``start_layer``, or no trainable weight selected.
    """

    def __init__(self, model: keras.Model, start_layer: Optional[Union[str, int]] = None,
                 last_layer: Optional[Union[str, int]] = None, loss_function: Optional[Callable] = None,
                 process_batch_for_loss_fn: ProcessBatchTypeAlias = default_process_batch,
                 strategy: Optional[tf.distribute.Strategy] = None):
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a Keras 3 model (keras.Model), got {type(model).__name__}.")
        if not model.built:
            raise ValueError(f"model {model.name!r} is not built, so its layers have no weights yet: start it with "
                             "keras.Input(shape), call model.build((None, *input_shape)) or call it on a batch before "
                             "wrapping it in InfluenceModel.")
        if loss_function is None:
            last_layer, loss_function = loss_given_as_last_layer(last_layer, loss_function, callable)
        self.start_layer = start_layer
        self.last_layer = last_layer
        if start_layer is None:
            start_index = _last_weighted_layer_before_output(model)
        else:
            start_index = _resolve_index(model, start_layer, "start_layer")
        last_index = start_index if last_layer is None else _resolve_index(model, last_layer, "last_layer")
        if last_index < start_index:
            raise ValueError(f"last_layer ({last_layer!r}, index {last_index}) comes before start_layer "
                             f"({start_layer!r}, index {start_index}).")
        self.start_layer_index = start_index
        self.last_layer_index = last_index
        selected = model.layers[start_index:last_index + 1]
        weights = [variable for layer in selected for variable in layer.trainable_weights]
        if not weights:
            names = [layer.name for layer in selected]
            raise ValueError(f"The selected layers {names} have no trainable weights.")
        super().__init__(model, weights, loss_function, process_batch_for_loss_fn, weights_processed=True,
                         strategy=strategy)
