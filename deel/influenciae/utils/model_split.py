"""Cut a Keras model in two at a layer: a feature extractor (everything below the layer) and a head.

Three kinds of models are handled:

* **Sequential** (built from a list or with ``.add()``): the halves are rebuilt as new Sequential models around
  the same layer objects (``.add()`` leaves stale graph nodes on the layers, so their ``.input`` cannot be used);
* **Functional**, with one input or several (a list or a dict of inputs): the cut is the input tensor of the
  layer in the model's graph; it must be a cut (no skip connection around it) and a single tensor;
* **subclassed** models have no graph and cannot be cut: :class:`LayerInputCapture` records the input of a
  layer while the whole model runs instead.
"""
import contextlib
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import keras
import tensorflow as tf

from .tf_operations import find_layer


class NotSplittableError(ValueError):
    """The model cannot be cut at the requested layer (subclassed model, or not a cut of the graph)."""


def layer_index(model: keras.Model, layer: Union[str, int, keras.layers.Layer]) -> int:
    """Non-negative index in ``model.layers`` of a layer given by name, index or object."""
    if isinstance(layer, keras.layers.Layer):
        for index, candidate in enumerate(model.layers):
            if candidate is layer:
                return index
        raise ValueError(f"Layer {layer.name!r} is not a layer of the model.")
    target = find_layer(model, layer)
    return [candidate is target for candidate in model.layers].index(True)


def model_inputs_structure(model: keras.Model) -> Optional[Any]:
    """The symbolic inputs of a Sequential or Functional model in the structure the model is called with (one
    tensor, a list or a dict); None for a model without a graph (subclassed, or a Sequential without input)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    structure = getattr(model, "_inputs_struct", None)
    if structure is not None:
        return structure
    return inputs[0] if len(inputs) == 1 else list(inputs)


def _single_output(model: keras.Model) -> Any:
    outputs = model.outputs
    if len(outputs) != 1:
        raise NotSplittableError(f"Cannot split the model: it has {len(outputs)} outputs, expected one.")
    return outputs[0]


def _split_sequential(model: keras.Sequential, index: int) -> Tuple[keras.Model, keras.Model]:
    """New Sequential models around the same layers (weights shared): ``layers[:index]`` and ``layers[index:]``."""
    layers = list(model.layers)
    model_input = model.inputs[0]
    extractor = keras.Sequential([keras.Input(batch_shape=model_input.shape, dtype=model_input.dtype)]
                                 + layers[:index])
    cut = extractor.outputs[0]
    head = keras.Sequential([keras.Input(batch_shape=cut.shape, dtype=cut.dtype)] + layers[index:])
    return extractor, head


def _split_functional(model: keras.Model, layer: keras.layers.Layer) -> Tuple[keras.Model, keras.Model]:
    """Halves of a Functional model at the input of ``layer`` (trying each of its graph nodes)."""
    model_input = model_inputs_structure(model)
    model_output = _single_output(model)
    errors: List[str] = []
    nodes = getattr(layer, "_inbound_nodes", None) or []
    candidates = [node.input_tensors for node in nodes] if nodes else [tf.nest.flatten(layer.input)]
    for tensors in candidates:
        if len(tensors) != 1:
            errors.append(f"the layer takes {len(tensors)} input tensors, expected one")
            continue
        try:
            return keras.Model(model_input, tensors[0]), keras.Model(tensors[0], model_output)
        except ValueError as error:
            errors.append(str(error))
    raise NotSplittableError(f"Layer {layer.name!r} is not a cut of the model's graph (a skip connection may go "
                             f"around it, or it takes several tensors), so the model cannot be split there: "
                             f"{'; '.join(errors)}")


def split_model_shared(model: keras.Model, target_layer: Union[str, int, keras.layers.Layer]
                       ) -> Tuple[Optional[keras.Model], keras.Model]:
    """Split a built model into a feature extractor and a head that share the model's variables.

    The head starts with ``target_layer`` (it is the first layer of the head); the feature extractor computes
    the input of ``target_layer`` from the model's inputs (one tensor, a list or a dict). When ``target_layer``
    is the first computing layer of the model the feature extractor is ``None`` and the head is ``model`` itself.

    Parameters
    ----------
    model
        A built Sequential (built from a list or with ``.add()``) or Functional Keras model with one output.
    target_layer
        Name, index in ``model.layers`` or layer object.

    Returns
    -------
    feature_extractor, head
        ``head(feature_extractor(x)) == model(x)``.

    Raises
    ------
    NotSplittableError
        (a ``ValueError``) If the model has no graph (subclassed, or not built with a known input shape), if the
        target is an input layer, or if the target is not a cut of the graph (e.g. a skip connection goes around
        it).
    """
    if model_inputs_structure(model) is None:
        raise NotSplittableError("The model must be built with a known input shape (e.g. start it with keras.Input) "
                                 "to be split; subclassed models cannot be split.")
    index = layer_index(model, target_layer)
    layer = model.layers[index]
    if isinstance(layer, keras.layers.InputLayer):
        raise NotSplittableError(f"Cannot split the model at its input layer {layer.name!r}.")
    first_computing = 1 if isinstance(model.layers[0], keras.layers.InputLayer) else 0
    if index == first_computing and len(model.inputs) == 1:
        return None, model
    if isinstance(model, keras.Sequential):
        return _split_sequential(model, index)
    return _split_functional(model, layer)


def split_model(model: keras.Model, target_layer: Union[str, int, keras.layers.Layer]
                ) -> Tuple[keras.Model, keras.Model]:
    """Split a *copy* of ``model`` into ``(feature_extractor, head)`` at ``target_layer``.

    The copy is taken when this function is called (later changes to ``model`` do not reach the halves).
    ``feature_extractor`` computes the input of ``target_layer`` and ``head`` everything from ``target_layer``
    onwards, so ``head(feature_extractor(x)) == model(x)``. When ``target_layer`` is the first layer, the
    feature extractor is the identity.

    Raises
    ------
    NotSplittableError
        See :func:`split_model_shared`; also when the model cannot be copied.
    """
    index = layer_index(model, target_layer)
    if model_inputs_structure(model) is None:
        raise NotSplittableError("The model must be built with a known input shape (e.g. start it with keras.Input) "
                                 "to be split; subclassed models cannot be split.")
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    feature_extractor, head = split_model_shared(clone, index)
    if feature_extractor is None:
        model_input = model_inputs_structure(clone)
        feature_extractor = keras.Model(model_input, model_input)
    return feature_extractor, head


class LayerInputCapture:
    """The input of one layer of a model, obtained by running the whole model: works for every model, subclassed
    ones included (no graph needed).

    While the model runs, the layer's ``call`` is temporarily wrapped to record its first argument; the model is
    left unchanged afterwards (also when an exception is raised).

    Parameters
    ----------
    model
        Any built Keras model.
    layer
        The layer whose input is wanted (a layer object of ``model``). It must be called exactly once per model
        call.
    """

    def __init__(self, model: keras.Model, layer: keras.layers.Layer):
        self.model = model
        self.layer = layer

    @contextlib.contextmanager
    def _recording(self) -> Iterator[List[Any]]:
        recorded: List[Any] = []
        original: Callable = self.layer.call

        def recording_call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            recorded.append(inputs)
            return original(inputs, *args, **kwargs)

        self.layer.call = recording_call
        try:
            yield recorded
        finally:
            del self.layer.call  # back to the class's method

    def __call__(self, inputs: Any, training: bool = False) -> tf.Tensor:
        """Input of the layer for ``inputs``: (B, *layer input shape)."""
        with self._recording() as recorded:
            self.model(inputs, training=training)
        if len(recorded) != 1:
            raise ValueError(f"Layer {self.layer.name!r} was called {len(recorded)} times by the model; its input can "
                             "only be captured from a layer called once.")
        return recorded[0]
