"""The part of an influence model above a cut: what iterative solvers run their Hessian-vector products on.

Below the first watched layer nothing depends on the watched weights, so its outputs (the head's inputs) can be
computed once per training sample; every Hessian-vector product then only runs the head.
"""
import warnings
import weakref
from typing import Any, Dict, Optional, Tuple, Union

import keras
import tensorflow as tf

from ..utils.model_split import NotSplittableError, split_model_shared
from .model_wrappers import BaseInfluenceModel

# The heads built for an influence model, by cut: shared by every solver built on it (building a second solver
# traces nothing).
_HEADS: "weakref.WeakKeyDictionary[BaseInfluenceModel, Dict[Any, Tuple[Optional[keras.Model], Any]]]" = \
    weakref.WeakKeyDictionary()


class HeadModel(BaseInfluenceModel):
    """The part of a model above a cut, watching the same weights, fed with precomputed features."""

    def __init__(self, head: keras.Model, weights: Any, loss_function: Any,
                 strategy: Optional[tf.distribute.Strategy] = None):
        # Features are stored as (features, targets, sample_weight) triples whatever the user's batch layout.
        super().__init__(head, weights, loss_function, feature_batch, weights_processed=True, strategy=strategy)


def feature_batch(batch: Tuple) -> Tuple[Any, Any, Any]:
    """``(features, targets, sample_weight or None)`` of a batch of cached head inputs."""
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


def split_for_hvp(model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]]
                   ) -> Tuple[Optional[keras.Model], "HeadModel"]:
    """``(feature extractor or None, head influence model)`` for a cut at ``extractor_layer``.

    Cached on the influence model, so that every solver built on it shares the head and its compiled kernels
    (building a second solver traces nothing).
    """
    cache = _HEADS.setdefault(model, {})
    if extractor_layer not in cache:
        extractor, head = None, model.model
        if extractor_layer is not None:
            try:
                extractor, head = split_model_shared(model.model, extractor_layer)
            except NotSplittableError as error:
                # Correct without a cut, only slower: every Hessian-vector product runs the whole model.
                warnings.warn(f"The model cannot be cut at extractor_layer={extractor_layer!r} ({error}); "
                              "Hessian-vector products will run the whole model on the raw inputs.",
                              RuntimeWarning, stacklevel=4)
        head_ids = {id(variable) for variable in head.variables}
        outside = [variable.path for variable in model.weights if id(variable) not in head_ids]
        if outside:
            raise ValueError(f"Watched weights {outside} lie below extractor_layer={extractor_layer!r}; the head "
                             "must contain every watched weight (pick an earlier extractor_layer).")
        cache[extractor_layer] = (extractor, HeadModel(head, model.weights, model.loss_function,
                                                       model.strategy))
    return cache[extractor_layer]
