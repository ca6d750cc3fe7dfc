"""Named results of the eager API."""
from typing import Any, NamedTuple, Optional

import tensorflow as tf


class TopK(NamedTuple):
    """The k most (or least) influential training samples, best first.

    For one query (self-influence over a training set) the fields have a leading axis of k; for T test samples
    they are (T, k). Ties keep the earlier training sample.

    Attributes
    ----------
    values : tf.Tensor
        (k,) or (T, k) influence values.
    indices : tf.Tensor
        (k,) or (T, k) int64 positions of the training samples in the training dataset's iteration order.
    samples : Any, optional
        The training inputs, (k, *x_shape) or (T, k, *x_shape) (a structure of such tensors for models with several
        inputs), when asked for (``return_samples=True``); None otherwise.
    """

    values: tf.Tensor
    indices: tf.Tensor
    samples: Optional[Any] = None
