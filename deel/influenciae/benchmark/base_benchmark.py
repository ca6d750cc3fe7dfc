"""Mislabeled-sample detection: the protocol shared by every dataset (SPEC §3.18).

A fraction of the training labels is replaced by another class, a model is trained on the noisy labels, and a
self-influence method ranks the training samples by descending score. A good method puts the mislabeled samples
first. The *detection curve* at rank r is the fraction of all mislabeled samples found among the r samples of
highest score; its mean over r (the area under it, the reference's "roc") is about 0.5 for a random ranking and
close to 1 for a perfect one.
"""
import importlib.util
import json
import os
import random
import re
import time
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..evaluation.mislabel_detection import detection_area, detection_curve
from .noise import draw_noisy_labels, labels_as_numpy

BenchEntry = Tuple[np.ndarray, np.ndarray, float]


class BaseTrainingProcedure(ABC):
    """Trains a fresh model on a (noisy) training dataset; subclasses fix the model and the schedule."""

    @abstractmethod
    def train(self, training_dataset: tf.data.Dataset, test_dataset: tf.data.Dataset, train_batch_size: int = 128,
              test_batch_size: int = 128, log_path: Optional[str] = None) -> Tuple[float, float, keras.Model, Any]:
        """Train a new model.

        Parameters
        ----------
        training_dataset, test_dataset
            Unbatched datasets of ``(x, one_hot_y)``.
        train_batch_size, test_batch_size
            Batch sizes of the training and of the evaluation of the test accuracy.
        log_path
            Optional folder for logs (e.g. TensorBoard).

        Returns
        -------
        train_acc, test_acc, model, train_info
            Accuracies (on the noisy training labels and on the test set), the trained model and what the
            influence factories may need besides the model (e.g. TracIn checkpoints ``(models, learning_rates)``).
        """


def require_tensorboard() -> None:
    """Raise a clear ``ImportError`` when the ``tensorboard`` package (needed by TensorBoard logs) is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError("use_tensorboard needs the tensorboard package (pip install tensorboard); it is not "
                          "installed.")


def checkpoint_callbacks(epochs_to_save: Optional[List[int]], optimizer: Any, use_tensorboard: bool,
                         log_path: Optional[str]) -> Tuple[List[keras.callbacks.Callback], Any]:
    """Training callbacks: a :class:`~deel.influenciae.trac_in.ModelsSaver` when ``epochs_to_save`` is not empty
    (returned too, else None) and TensorBoard logs under ``{log_path}/training`` when asked."""
    from ..trac_in import ModelsSaver  # pylint: disable=import-outside-toplevel
    callbacks: List[keras.callbacks.Callback] = []
    saver = None
    if epochs_to_save:
        saver = ModelsSaver(epochs_to_save, optimizer)
        callbacks.append(saver)
    if use_tensorboard and log_path is not None:
        require_tensorboard()
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(log_path, "training")))
    return callbacks, saver


def _safe_name(name: str) -> str:
    """A file-system friendly version of a method name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "method"


class MislabelingDetectorEvaluator:
    """Benchmark of self-influence methods by mislabeled-sample detection.

    Parameters
    ----------
    training_dataset, test_dataset
        **Unbatched** datasets of ``(x, one_hot_y)``; the order of ``training_dataset`` must be deterministic.
    training_procedure
        A :class:`BaseTrainingProcedure` training a fresh model for every evaluation.
    nb_classes
        Number of classes C.
    mislabeling_ratio
        Probability in (0, 1) that a training label is replaced by another class.
    train_batch_size, test_batch_size
        Batch sizes given to the training procedure.
    influence_batch_size
        Batch size of the datasets given to the influence calculators (default ``train_batch_size``).
    config
        Extra settings written to ``config.json`` next to the results.

    Attributes
    ----------
    timings : dict
        ``{method_name: {"train_seconds": [...], "influence_seconds": [...]}}`` per evaluation, filled by
        :meth:`evaluate`.
    last_noise_indexes : np.ndarray
        Indices of the mislabeled samples of the last noisy dataset built.
    """

    def __init__(self, training_dataset: tf.data.Dataset, test_dataset: tf.data.Dataset,
                 training_procedure: BaseTrainingProcedure, nb_classes: int, mislabeling_ratio: float,
                 train_batch_size: int = 128, test_batch_size: int = 128, influence_batch_size: Optional[int] = None,
                 config: Optional[Dict[str, Any]] = None):
        if not 0 < mislabeling_ratio < 1:
            raise ValueError(f"mislabeling_ratio must be in (0, 1), got {mislabeling_ratio}.")
        if int(nb_classes) < 2:
            raise ValueError(f"nb_classes must be >= 2, got {nb_classes}.")
        self.training_dataset = training_dataset
        self.test_dataset = test_dataset
        self.training_procedure = training_procedure
        self.nb_classes = int(nb_classes)
        self.mislabeling_ratio = float(mislabeling_ratio)
        self.train_batch_size = int(train_batch_size)
        self.test_batch_size = int(test_batch_size)
        self.influence_batch_size = int(influence_batch_size or train_batch_size)
        self.config = dict(config or {})
        self._clean_labels: Optional[np.ndarray] = None
        self.timings: Dict[str, Dict[str, List[float]]] = {}
        self.last_noise_indexes: Optional[np.ndarray] = None

    # Noise ----------------------------------------------------------------------------------------
    @property
    def clean_labels(self) -> np.ndarray:
        """The original one-hot training labels (N, C), read once from ``training_dataset``."""
        if self._clean_labels is None:
            labels = labels_as_numpy(self.training_dataset)
            if labels.ndim != 2 or labels.shape[1] != self.nb_classes:
                raise ValueError(f"Training labels must be one-hot of shape (N, {self.nb_classes}), got "
                                 f"{labels.shape}.")
            self._clean_labels = labels
        return self._clean_labels

    def build_noisy_training_dataset(self, seed: Optional[int] = None) -> Tuple[tf.data.Dataset, np.ndarray]:
        """The training dataset with a fraction of its labels replaced by another class.

        The new labels are drawn eagerly with NumPy (``np.random.default_rng(seed)``; with ``seed=None`` from
        NumPy's global generator, itself seeded by :meth:`set_seed`), so the dataset is the same at every
        iteration and the same for a given seed.

        Parameters
        ----------
        seed
            Seed of the draw.

        Returns
        -------
        noisy_dataset, noise_indexes
            Unbatched dataset of ``(x, noisy_one_hot_y)`` in the original order, and the sorted indices (M,) of
            the mislabeled samples.
        """
        labels = self.clean_labels
        rng = np.random.default_rng(seed if seed is not None else np.random.randint(0, 2 ** 31 - 1))
        noisy_labels, noise_indexes = draw_noisy_labels(labels, self.mislabeling_ratio, rng)
        inputs = self.training_dataset.map(lambda x, _: x)
        noisy = tf.data.Dataset.zip(inputs, tf.data.Dataset.from_tensor_slices(noisy_labels))
        self.last_noise_indexes = noise_indexes
        return noisy, noise_indexes

    # Curves ---------------------------------------------------------------------------------------
    @staticmethod
    def compute_detection_curve(influence_values: Any, noise_indexes: Any) -> np.ndarray:
        """Fraction of the mislabeled samples found among the r samples of highest self-influence, r = 1..N.

        Samples are ranked by descending value (ties keep the dataset order).

        Parameters
        ----------
        influence_values
            Self-influence of the N training samples, (N,) or (N, 1).
        noise_indexes
            Indices of the mislabeled samples.

        Returns
        -------
        np.ndarray
            (N,) non-decreasing curve ending at 1 (the raw counts when there is no mislabeled sample).
        """
        return detection_curve(influence_values, noise_indexes)

    @staticmethod
    def _compute_roc(curve: Any) -> float:
        """Area under the detection curve: its mean (about 0.5 for a random ranking)."""
        return detection_area(curve)

    @staticmethod
    def set_seed(seed: int) -> None:
        """Seed Python's, NumPy's and TensorFlow's random generators."""
        random.seed(seed)
        np.random.seed(seed)
        tf.random.set_seed(seed)
        keras.utils.set_random_seed(seed)

    @staticmethod
    def plot_tensorboard_roc(curve: Any, name: str) -> None:
        """Write a detection curve as TensorBoard scalars (step = rank) in the default summary writer."""
        for step, value in enumerate(np.asarray(curve, dtype=np.float64).reshape(-1)):
            tf.summary.scalar(name, value, step=step)

    # Evaluation -----------------------------------------------------------------------------------
    def evaluate(self, influence_factory: Any, nbr_of_evaluation: int, seed: int = 0, verbose: bool = True,
                 path_to_save: Optional[str] = None, use_tensorboard: bool = False,
                 method_name: Optional[str] = None) -> BenchEntry:
        """Run the protocol ``nbr_of_evaluation`` times (seeds ``seed``, ``seed + 1``, ...).

        Each evaluation clears the Keras session, seeds every generator with ``seed + i``, mislabels the
        training set, trains a model, builds the calculator with
        ``influence_factory.build(noisy.shuffle(1000).batch(influence_batch_size), model, train_info)``, computes
        the self-influence (``calculator.self_influence``) of the **unshuffled** noisy training set and its
        detection curve.

        Parameters
        ----------
        influence_factory
            An :class:`~deel.influenciae.benchmark.InfluenceCalculatorFactory`.
        nbr_of_evaluation
            Number of evaluations E.
        seed
            First seed.
        verbose
            Print one line per evaluation.
        path_to_save
            If given, ``{path_to_save}/{method_name}.npz`` (via ``BenchmarkDisplay.save_bench_result``, updated
            after every evaluation) and ``{path_to_save}/{method_name}_config.json`` are written.
        use_tensorboard
            Also write the curves and areas as TensorBoard scalars under ``{path_to_save}/{method_name}/``.
        method_name
            Name of the method (default: the factory's class name).

        Returns
        -------
        curves, mean_curve, roc
            The E curves (E, N), their mean (N,) and the area under the mean curve.

        Raises
        ------
        ImportError
            With ``use_tensorboard`` when the tensorboard package is missing.
        """
        if int(nbr_of_evaluation) < 1:
            raise ValueError(f"nbr_of_evaluation must be >= 1, got {nbr_of_evaluation}.")
        if use_tensorboard:
            require_tensorboard()
        method_name = method_name or type(influence_factory).__name__
        timings = self.timings.setdefault(method_name, {"train_seconds": [], "influence_seconds": []})
        timings["train_seconds"].clear()
        timings["influence_seconds"].clear()
        if path_to_save is not None:
            self._save_config(path_to_save, method_name, influence_factory, nbr_of_evaluation, seed)
        curves: List[np.ndarray] = []
        for index in range(int(nbr_of_evaluation)):
            current_seed = int(seed) + index
            keras.backend.clear_session()
            self.set_seed(current_seed)
            noisy, noise_indexes = self.build_noisy_training_dataset(current_seed)
            log_path = None if path_to_save is None else os.path.join(path_to_save, _safe_name(method_name),
                                                                      f"seed{current_seed}")
            start = time.perf_counter()
            train_acc, test_acc, model, train_info = self.training_procedure.train(
                noisy, self.test_dataset, self.train_batch_size, self.test_batch_size, log_path)
            train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            shuffled = noisy.shuffle(1000, seed=current_seed, reshuffle_each_iteration=False)
            calculator = influence_factory.build(shuffled.batch(self.influence_batch_size), model, train_info)
            values = calculator.self_influence(noisy.batch(self.influence_batch_size))
            influence_seconds = time.perf_counter() - start
            curve = self.compute_detection_curve(np.asarray(values), noise_indexes)
            curves.append(curve)
            timings["train_seconds"].append(train_seconds)
            timings["influence_seconds"].append(influence_seconds)
            if verbose:
                print(f"[{method_name}] evaluation {index + 1}/{nbr_of_evaluation} (seed {current_seed}): "
                      f"{len(noise_indexes)} mislabeled of {curve.size}, train acc {train_acc:.3f}, test acc "
                      f"{test_acc:.3f}, detection area {self._compute_roc(curve):.4f}, training "
                      f"{train_seconds:.1f} s, influence {influence_seconds:.1f} s", flush=True)
            if use_tensorboard and path_to_save is not None:
                self._write_tensorboard(path_to_save, method_name, current_seed, curve, np.mean(curves, axis=0))
            if path_to_save is not None:
                stacked = np.stack(curves)
                self._save(path_to_save, method_name, (stacked, stacked.mean(axis=0),
                                                       self._compute_roc(stacked.mean(axis=0))))
        stacked = np.stack(curves)
        mean_curve = stacked.mean(axis=0)
        return stacked, mean_curve, self._compute_roc(mean_curve)

    def bench(self, influence_calculator_factories: Dict[str, Any], nbr_of_evaluation: int,
              path_to_save: Optional[str] = None, seed: int = 0, verbose: bool = True,
              use_tensorboard: bool = False) -> Dict[str, BenchEntry]:
        """:meth:`evaluate` every factory (same seeds, hence the same noisy labels, for all).

        Parameters
        ----------
        influence_calculator_factories
            ``{method_name: factory}``.
        nbr_of_evaluation, seed, verbose, use_tensorboard
            See :meth:`evaluate`.
        path_to_save
            Folder of the results: one ``{method}.npz`` per method (read them all back with
            ``BenchmarkDisplay.load_bench_result(path_to_save)``) and its config.

        Returns
        -------
        dict
            ``{method_name: (curves (E, N), mean_curve (N,), roc)}``.
        """
        result = {}
        for name, factory in influence_calculator_factories.items():
            result[name] = self.evaluate(factory, nbr_of_evaluation, seed=seed, verbose=verbose,
                                         path_to_save=path_to_save, use_tensorboard=use_tensorboard,
                                         method_name=name)
        return result

    # Saving ---------------------------------------------------------------------------------------
    @staticmethod
    def result_path(path_to_save: str, method_name: str) -> str:
        """Where :meth:`evaluate` saves a method's result."""
        return os.path.join(path_to_save, f"{_safe_name(method_name)}.npz")

    def _save(self, path_to_save: str, method_name: str, entry: BenchEntry) -> None:
        from ..plots.benchmark import BenchmarkDisplay  # pylint: disable=import-outside-toplevel
        os.makedirs(path_to_save, exist_ok=True)
        BenchmarkDisplay.save_bench_result({method_name: entry}, self.result_path(path_to_save, method_name))

    def _save_config(self, path_to_save: str, method_name: str, factory: Any, nbr_of_evaluation: int,
                     seed: int) -> None:
        os.makedirs(path_to_save, exist_ok=True)
        config = dict(self.config)
        config.update({"method_name": method_name, "factory": type(factory).__name__,
                       "factory_settings": {key: repr(value) for key, value in vars(factory).items()},
                       "mislabeling_ratio": self.mislabeling_ratio, "nb_classes": self.nb_classes,
                       "train_batch_size": self.train_batch_size, "test_batch_size": self.test_batch_size,
                       "influence_batch_size": self.influence_batch_size, "nbr_of_evaluation": int(nbr_of_evaluation),
                       "seed": int(seed)})
        with open(os.path.join(path_to_save, f"{_safe_name(method_name)}_config.json"), "w",
                  encoding="utf-8") as handle:
            json.dump(config, handle, indent=1, default=repr)

    def _write_tensorboard(self, path_to_save: str, method_name: str, current_seed: int, curve: np.ndarray,
                           mean_curve: np.ndarray) -> None:
        writer = tf.summary.create_file_writer(os.path.join(path_to_save, _safe_name(method_name), "tensorboard"))
        with writer.as_default():
            tf.summary.scalar("roc_value", self._compute_roc(curve), step=current_seed)
            tf.summary.scalar("roc_mean", self._compute_roc(mean_curve), step=current_seed)
            self.plot_tensorboard_roc(curve, f"roc_curve_seed{current_seed}")
            self.plot_tensorboard_roc(mean_curve, "roc_curve_mean")
        writer.flush()
