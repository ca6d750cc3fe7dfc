"""Collect TracIn checkpoints (model copies and learning rates) while ``model.fit`` runs."""
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import keras
import tensorflow as tf

_INDEX_FILE = "checkpoints.json"


def _current_learning_rate(optimizer: Any) -> float:
    """The learning rate the optimizer uses now (schedules are evaluated at the current iteration)."""
    rate = getattr(optimizer, "learning_rate", None)
    if rate is None:
        raise ValueError(f"Cannot read a learning rate from the optimizer {type(optimizer).__name__}.")
    if callable(rate) and not hasattr(rate, "numpy"):  # an un-evaluated schedule
        rate = rate(optimizer.iterations)
    # Through a TF tensor: keras.ops.convert_to_numpy on a Keras variable warns under numpy 2 (copy keyword).
    value = rate.value if isinstance(rate, keras.Variable) else rate
    return float(tf.cast(tf.convert_to_tensor(value), tf.float64).numpy())


def _copy_model(model: keras.Model) -> keras.Model:
    """An independent copy of a Sequential or Functional model with the current weights."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


class ModelsSaver(keras.callbacks.Callback):
    """Keras callback that keeps a copy of the model and the optimizer's current learning rate at chosen epochs.

    At the end of every (0-based) epoch listed in ``epochs_to_save`` the callback copies the model (the trained
    model is never touched) and reads the learning rate the optimizer uses at that moment (a schedule is evaluated
    at the current step). These are the checkpoints and rates of TracInCP::

        saver = ModelsSaver([4, 9, 14])
        model.fit(train, epochs=15, callbacks=[saver])
        tracin = TracIn.from_models_saver(saver, loss_function)

    Parameters
    ----------
    epochs_to_save
        0-based epoch indices (as passed to ``on_epoch_end``) after which a checkpoint is taken.
    optimizer
        Optimizer whose learning rate is recorded; defaults to ``model.optimizer`` of the model being trained.
    saving_path
        If given, each checkpoint is also written to ``{saving_path}/checkpoint_epoch_{epoch:04d}.keras`` and the
        list of files and learning rates to ``{saving_path}/checkpoints.json``; reload them with
        :meth:`load` (or :meth:`load_checkpoints`).
    keep_in_memory
        Keep the copies in ``self.models`` (default). With ``False`` and a ``saving_path``, only the files are kept
        and :meth:`checkpoints` reloads them.

    Attributes
    ----------
    models : list of keras.Model
        The in-memory copies, in the order they were taken.
    learning_rates : list of float
        The learning rate at each checkpoint.
    epochs : list of int
        The epoch of each checkpoint.
    paths : list of str
        The saved files (when ``saving_path`` is given).
    """

    def __init__(self, epochs_to_save: Iterable[int], optimizer: Any = None, saving_path: Optional[str] = None,
                 keep_in_memory: bool = True):
        super().__init__()
        epochs = sorted({int(epoch) for epoch in epochs_to_save})
        if not epochs or epochs[0] < 0:
            raise ValueError(f"epochs_to_save must hold at least one epoch index >= 0, got {list(epochs_to_save)}.")
        if not keep_in_memory and saving_path is None:
            raise ValueError("keep_in_memory=False needs a saving_path, or the checkpoints would be lost.")
        self.epochs_to_save = epochs
        self.optimizer = optimizer
        self.saving_path = saving_path
        self.keep_in_memory = bool(keep_in_memory)
        self.models: List[keras.Model] = []
        self.learning_rates: List[float] = []
        self.epochs: List[int] = []
        self.paths: List[str] = []

    def on_epoch_end(self, epoch: int, logs: Optional[Dict] = None) -> None:
        if epoch not in self.epochs_to_save:
            return
        optimizer = self.optimizer if self.optimizer is not None else getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError("ModelsSaver needs an optimizer: compile the model or pass optimizer=.")
        rate = _current_learning_rate(optimizer)
        copy = _copy_model(self.model)
        self.epochs.append(int(epoch))
        self.learning_rates.append(rate)
        if self.keep_in_memory:
            self.models.append(copy)
        if self.saving_path is not None:
            os.makedirs(self.saving_path, exist_ok=True)
            path = os.path.join(self.saving_path, f"checkpoint_epoch_{epoch:04d}.keras")
            copy.save(path)
            self.paths.append(path)
            index = [{"epoch": e, "file": os.path.basename(p), "learning_rate": r}
                     for e, p, r in zip(self.epochs, self.paths, self.learning_rates)]
            with open(os.path.join(self.saving_path, _INDEX_FILE), "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=1)

    def checkpoints(self) -> Tuple[List[keras.Model], List[float]]:
        """The checkpoint models and their learning rates (loaded from disk when not kept in memory)."""
        if self.keep_in_memory:
            models = list(self.models)
        else:
            models = [keras.models.load_model(path, compile=False) for path in self.paths]
        if not models:
            raise ValueError("No checkpoint was taken: check epochs_to_save against the number of epochs trained.")
        return models, list(self.learning_rates)

    @staticmethod
    def load_checkpoints(saving_path: str, custom_objects: Optional[Dict] = None
                         ) -> Tuple[List[keras.Model], List[float]]:
        """Reload the models and learning rates written under ``saving_path``.

        Raises
        ------
        FileNotFoundError
            If no checkpoint index is found there.
        """
        index_path = os.path.join(saving_path, _INDEX_FILE)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"No checkpoints saved under {saving_path!r} (missing {_INDEX_FILE}).")
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        models = [keras.models.load_model(os.path.join(saving_path, entry["file"]), custom_objects=custom_objects,
                                          compile=False) for entry in index]
        return models, [float(entry["learning_rate"]) for entry in index]

    @classmethod
    def load(cls, saving_path: str, custom_objects: Optional[Dict] = None) -> "ModelsSaver":
        """A saver holding in memory the checkpoints written under ``saving_path`` (usable with
        ``TracIn.from_models_saver``)."""
        models, rates = cls.load_checkpoints(saving_path, custom_objects)
        with open(os.path.join(saving_path, _INDEX_FILE), encoding="utf-8") as handle:
            index = json.load(handle)
        saver = cls([entry["epoch"] for entry in index])
        saver.models, saver.learning_rates = models, rates
        saver.epochs = [int(entry["epoch"]) for entry in index]
        saver.paths = [os.path.join(saving_path, entry["file"]) for entry in index]
        return saver
