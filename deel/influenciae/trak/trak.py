r"""TRAK (Park et al. 2023): influence from randomly projected gradients and their kernel, over model ensembles."""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ..common.base_influence import BaseInfluenceCalculator
from ..common.executor import Executor
from ..common.gradient_projector import GradientProjector
from ..common.index_format import atomic_write, calculator_fingerprint
from ..common.ihvp_base import check_regularization, default_rcond
from ..common.memory import DEFAULT_MEMORY_BUDGET_BYTES
from ..common.model_wrappers import BaseInfluenceModel, assert_finite
from ..utils.linear_algebra import symmetric_eigh
from ..utils.tf_operations import assert_batched_dataset

_REWEIGHTS = (None, "cross_entropy", "margin")


def _finite(tensor: tf.Tensor, what: str) -> tf.Tensor:
    """``tensor``, after a check that it is finite when it is eager (lazy dataset results are checked when read)."""
    if tf.executing_eagerly():
        assert_finite(tensor, what)
    return tensor


def margin_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    r"""Minus TRAK's model output function for classification, per sample: ``-f(z) = -(logit_y - logsumexp_{j≠y}
    logit_j) = -log(p_y / (1 - p_y))`` (the paper's "margin"), from logits ``y_pred`` (B, C) and labels ``y_true``
    (B,) integers or (B, C) one-hot.

    Give it as the ``loss_function`` of the :class:`~deel.influenciae.common.InfluenceModel` of each model to follow
    the paper (gradients of the margin), with ``TRAK(..., reweight="margin")``. It is a loss (smaller when the model
    is right), so that the library's sign convention holds: a positive influence means a proponent.

    Returns
    -------
    tf.Tensor
        (B,) values ``-f(z)``.
    """
    logits = tf.convert_to_tensor(y_pred)
    classes = tf.shape(logits)[-1]
    labels = tf.convert_to_tensor(y_true)
    if labels.shape.rank == logits.shape.rank and labels.shape[-1] != 1:
        labels = tf.argmax(labels, axis=-1)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    correct = tf.one_hot(labels, classes, on_value=True, off_value=False)
    true_logit = tf.reduce_sum(tf.where(correct, logits, tf.zeros_like(logits)), axis=-1)
    others = tf.where(correct, tf.constant(-np.inf, logits.dtype), logits)
    return tf.reduce_logsumexp(others, axis=-1) - true_logit


class TRAK(BaseInfluenceCalculator):
    r"""TRAK: influence functions of a linearised model in a randomly projected gradient space, over an ensemble.

    The ensemble holds M models: independently trained models, or checkpoints of one training. For each model
    s = 1..M, with ``φ_s(z) = P g_s(z)`` the projected per-sample gradient of z's loss (d values,
    :class:`~deel.influenciae.common.GradientProjector`), ``Φ_s`` (N, d) those of the N training samples and
    ``K_s = Φ_sᵀ Φ_s / N + λ_s I`` the kernel (the Gauss–Newton matrix of the linearised model in the projected
    space, on the mean-loss scale of the other inverse-Hessian products):

    * influence of training sample z on test sample t: ``I(t, z) = (1/M) Σ_s w_s(z) φ_s(t)ᵀ K_s⁻¹ φ_s(z)``, with
      ``w_s(z) = 1 - p_s(z)`` (the probability the model gives z's label) when ``reweight`` is set, else 1.
      **Positive**: z is a proponent of t (training on z lowered t's loss); negative: an opponent. TRAK's paper has
      no 1/N in the kernel: its scores are these divided by N;
    * influence vector of z: ``v(z) = [w_1(z) φ_1(z), ..., w_M(z) φ_M(z)]`` (M · d values, what an index stores);
      test-side representation ``[K_1⁻¹ φ_1(t), ..., K_M⁻¹ φ_M(t)] / M``;
    * self-influence: ``(1/M) Σ_s w_s(z) φ_s(z)ᵀ K_s⁻¹ φ_s(z)`` (≥ 0), shape (B, 1).

    The kernels are fitted when the calculator is built: one pass over ``train_set`` per model (its projected
    gradients, never more than a batch of them held), then one eigendecomposition per model (d³ operations: 0.9 s
    at d = 2,048 and 7.5 s at d = 4,096 on 2 CPU cores, about 16 min at d = 20,480). ``with_regularization``
    re-damps without another pass.

    Parameters
    ----------
    models
        One :class:`~deel.influenciae.common.InfluenceModel` per model of the ensemble (or a single one), of one
        dtype. Their loss gives the gradients: a per-sample cross-entropy, or :func:`margin_loss` as in the paper.
    train_set
        Batched training dataset (iterated in a fixed order).
    projector
        The projection (default ``GradientProjector(2048, seed=0)``); every model uses the same one.
    regularization
        λ added to the eigenvalues of every ``Φᵀ Φ / N`` (absolute), ≥ 0.
    damping_heuristic
        If not None, each model's λ is ``regularization + damping_heuristic · mean eigenvalue of Φ_sᵀ Φ_s / N``
        (default 0.1). λ = 0 (the paper's formula with N ≥ d) is ill-conditioned on a model that fits its data: on
        the digits MLP of the fidelity benchmark the LDS fell to 0.005 against 0.34 with damping.
    reweight
        ``None`` (default), ``"cross_entropy"`` (the models' loss is ``-log p_y``: ``1 - p = 1 - exp(-loss)``) or
        ``"margin"`` (the loss is :func:`margin_loss`: ``1 - p = sigmoid(loss)``): the paper's ``1 - p`` weight of
        each training sample.
    verbose
        Progress bars (None: in interactive sessions only).
    memory_budget_bytes
        What held test sides and kernels may take.

    Raises
    ------
    ValueError
        No model, models of different dtypes, a negative or non-finite λ, an unknown ``reweight``, an unbatched or
        empty ``train_set``, non-finite projected gradients, kernels larger than ``memory_budget_bytes``.
    """

    def __init__(self, models: Sequence[BaseInfluenceModel], train_set: tf.data.Dataset,
                 projector: Optional[GradientProjector] = None, regularization: float = 0.0,
                 damping_heuristic: Optional[float] = 0.1, reweight: Optional[str] = None,
                 verbose: Optional[bool] = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES):
        models = [models] if isinstance(models, BaseInfluenceModel) else list(models)
        if not models:
            raise ValueError("TRAK needs at least one model (models is empty).")
        for position, model in enumerate(models):
            if not isinstance(model, BaseInfluenceModel):
                raise TypeError(f"models[{position}] must be an InfluenceModel, got {type(model).__name__}.")
        if len({model.dtype for model in models}) != 1:
            raise ValueError("All models must watch weights of one dtype.")
        projector = GradientProjector(2048) if projector is None else projector
        if not isinstance(projector, GradientProjector):
            raise TypeError(f"projector must be a GradientProjector, got {type(projector).__name__}.")
        if reweight not in _REWEIGHTS:
            raise ValueError(f"reweight must be one of {_REWEIGHTS}, got {reweight!r}.")
        assert_batched_dataset(train_set, "train_set")
        self.models = models
        self.dtype = models[0].dtype
        self.projector = projector
        self.regularization = check_regularization(regularization)
        self.damping_heuristic = None if damping_heuristic is None else check_regularization(damping_heuristic)
        self.reweight = reweight
        self.verbose = verbose
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._spectra: List[Tuple[tf.Tensor, tf.Tensor]] = self._fit(train_set)
        self._inverses = self._inverse_kernels()

    # Fit ----------------------------------------------------------------------------------------------------------
    def _fit(self, train_set: tf.data.Dataset) -> List[Tuple[tf.Tensor, tf.Tensor]]:
        """``(eigenvalues (d,), eigenvectors (d, d))`` of ``Φ_sᵀ Φ_s / N`` for every model, float64."""
        executor = Executor(None, self.verbose, self.memory_budget_bytes)
        spectra = []
        for position, model in enumerate(self.models):
            first = next(iter(executor.batches(train_set.take(1), name="train_set")), None)
            if first is None:
                raise ValueError("train_set is empty.")
            dim = self.projector.output_dim_for(model, first)
            if 3 * dim * dim * 8 > self.memory_budget_bytes:
                raise ValueError(f"The {dim} x {dim} kernel of TRAK (with its eigendecomposition, "
                                 f"{3 * dim * dim * 8 / 2 ** 30:.1f} GiB) exceeds memory_budget_bytes="
                                 f"{self.memory_budget_bytes}: lower the projector's output_dim or raise the budget.")
            bound = self.projector.bind(model)

            def gram(batch: Tuple, bound=bound) -> tf.Tensor:
                features = tf.cast(_finite(bound(batch), "projected gradients"), tf.float64)
                return tf.matmul(features, features, transpose_a=True)

            total, count = executor.sum(gram, train_set, f"TRAK kernel ({position + 1}/{len(self.models)})",
                                        "train_set", accumulate=tf.float64)
            spectra.append(symmetric_eigh(total / count))
        return spectra

    def _damping(self, values: tf.Tensor) -> float:
        damping = self.regularization
        if self.damping_heuristic is not None:
            damping += self.damping_heuristic * float(tf.reduce_mean(tf.maximum(values, 0.0)))
        return damping

    def _inverse_kernels(self) -> List[tf.Tensor]:
        """``K_s⁻¹`` (d, d) in the models' dtype; eigenvalues at or below ``default_rcond`` times the largest are
        dropped when λ = 0 (pseudo-inverse)."""
        inverses = []
        for values, vectors in self._spectra:
            damped = tf.maximum(values, 0.0) + self._damping(values)
            cut = default_rcond(int(values.shape[0]), tf.float64) * float(tf.reduce_max(tf.abs(values)))
            inverse_values = tf.where(damped > cut, 1.0 / tf.maximum(damped, cut), tf.zeros_like(damped))
            inverse = tf.matmul(vectors * inverse_values[None, :], vectors, transpose_b=True)
            inverses.append(tf.cast(inverse, self.dtype))
        return inverses

    @property
    def dampings(self) -> List[float]:
        """λ of every model (with the heuristic's part)."""
        return [self._damping(values) for values, _ in self._spectra]

    def with_regularization(self, regularization: float, damping_heuristic: Optional[float] = None) -> "TRAK":
        """A TRAK on the same fitted kernels with another λ (no pass over the data)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.regularization = check_regularization(regularization)
        copy.damping_heuristic = None if damping_heuristic is None else check_regularization(damping_heuristic)
        copy._inverses = copy._inverse_kernels()  # pylint: disable=protected-access
        return copy

    # Saving the fit -----------------------------------------------------------------------------------------------
    def _settings(self) -> Dict[str, Any]:
        return {"projector": self.projector.configuration(), "reweight": self.reweight,
                "regularization": self.regularization, "damping_heuristic": self.damping_heuristic,
                "models": len(self.models)}

    def save(self, path: str) -> None:
        """Save the fitted kernels (eigendecompositions, d² + d floats per model) and the settings to ``path``
        (a ``.npz`` file, written atomically), so that another process answers without a pass over the training
        set: :meth:`load`."""
        arrays = {"settings": np.asarray(json.dumps(self._settings(), sort_keys=True)),
                  "fingerprint": np.asarray(calculator_fingerprint(self)[0])}
        for position, (values, vectors) in enumerate(self._spectra):
            arrays[f"values_{position}"] = values.numpy()
            arrays[f"vectors_{position}"] = vectors.numpy()
        directory, name = os.path.split(os.path.abspath(os.fspath(path)))
        atomic_write(directory, name, lambda stream: np.savez(stream, **arrays))

    @classmethod
    def load(cls, path: str, models: Sequence[BaseInfluenceModel], verbose: Optional[bool] = None,
             memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> "TRAK":
        """A TRAK saved by :meth:`save`, on the same models (same weights, losses and order), without a pass over
        the data.

        Raises
        ------
        FileNotFoundError
            If nothing is saved at ``path``.
        ValueError
            If the models differ from those of the saved fit (their weights, losses or number).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No saved TRAK fit at {path!r}.")
        with np.load(path, allow_pickle=False) as archive:
            settings = json.loads(str(archive["settings"]))
            fingerprint = str(archive["fingerprint"])
            spectra = [(tf.constant(archive[f"values_{position}"]), tf.constant(archive[f"vectors_{position}"]))
                       for position in range(settings["models"])]
        trak = object.__new__(cls)
        models = [models] if isinstance(models, BaseInfluenceModel) else list(models)
        trak.models, trak.dtype = models, models[0].dtype if models else None
        trak.projector = GradientProjector(**{key: value for key, value in settings["projector"].items()
                                              if key != "block_rows"})
        trak.regularization, trak.damping_heuristic = settings["regularization"], settings["damping_heuristic"]
        trak.reweight, trak.verbose, trak.memory_budget_bytes = settings["reweight"], verbose, int(memory_budget_bytes)
        trak._spectra = spectra  # pylint: disable=protected-access
        if len(models) != settings["models"] or calculator_fingerprint(trak)[0] != fingerprint:
            raise ValueError(f"The TRAK fit saved at {path!r} was made with other models ({settings['models']} "
                             "model(s) with other weights or losses): load it with the models it was fitted on.")
        trak._inverses = trak._inverse_kernels()  # pylint: disable=protected-access
        return trak

    # Hooks --------------------------------------------------------------------------------------------------------
    def _features(self, samples: Tuple) -> List[tf.Tensor]:
        """``φ_s`` of every model for a batch: M tensors (B, d)."""
        samples = tuple(samples)
        return [_finite(self.projector.project_batch(model, samples), "projected gradients")
                for model in self.models]

    def _weights(self, samples: Tuple) -> List[Optional[tf.Tensor]]:
        """``1 - p_s(z)`` of every model (B, 1), or None without ``reweight``."""
        if self.reweight is None:
            return [None] * len(self.models)
        weights = []
        for model in self.models:
            losses = tf.cast(model.batch_loss_tensor(tuple(samples)), self.dtype)
            weight = -tf.math.expm1(-losses) if self.reweight == "cross_entropy" else tf.sigmoid(losses)
            weights.append(weight[:, None])
        return weights

    def _compute_influence_vector(self, train_samples: Tuple) -> tf.Tensor:
        """``[w_s(z) φ_s(z)]_s``: (B, M · d)."""
        parts = [features if weight is None else weight * features
                 for features, weight in zip(self._features(train_samples), self._weights(train_samples))]
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def _preprocess_samples(self, samples: Tuple) -> tf.Tensor:
        """``[K_s⁻¹ φ_s(t)]_s / M``: (B_t, M · d)."""
        count = tf.cast(len(self.models), self.dtype)
        parts = [tf.matmul(features, inverse) / count
                 for features, inverse in zip(self._features(samples), self._inverses)]
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: tf.Tensor,
                                                        influence_vector: tf.Tensor) -> tf.Tensor:
        """``I(t, z)`` for every pair: (B_t, B_tr)."""
        return tf.matmul(preproc_test_sample, tf.cast(influence_vector, preproc_test_sample.dtype), transpose_b=True)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Self-influence ``(1/M) Σ_s w_s(z) φ_s(z)ᵀ K_s⁻¹ φ_s(z)``: (B, 1)."""
        train_samples = tuple(train_samples)
        terms = []
        for features, weight, inverse in zip(self._features(train_samples), self._weights(train_samples),
                                             self._inverses):
            quadratic = tf.reduce_sum(tf.matmul(features, inverse) * features, axis=1, keepdims=True)
            terms.append(quadratic if weight is None else weight * quadratic)
        values = tf.add_n(terms) / tf.cast(len(self.models), self.dtype)
        return _finite(values, "self-influence values")

    # Groups -----------------------------------------------------------------------------------------------------
    def compute_influence_vector_group(self, group_train: tf.data.Dataset) -> tf.Tensor:
        """Influence vector of a group of training samples U, ``Σ_{z∈U} v(z)``: (1, M · d) (TRAK is additive: a
        group's influence is the sum of its members')."""
        assert_batched_dataset(group_train, "group_train")
        executor = Executor(None, self.verbose, self.memory_budget_bytes)
        total, _ = executor.sum(lambda batch: tf.reduce_sum(self._compute_influence_vector(batch), axis=0,
                                                            keepdims=True), group_train, None, "group_train")
        return _finite(total, "group influence vector")

    def estimate_influence_values_group(self, group_train: tf.data.Dataset,
                                        group_to_evaluate: Optional[tf.data.Dataset] = None) -> tf.Tensor:
        """Influence of the training group U on the group T (U itself by default), ``Σ_{t∈T} Σ_{z∈U} I(t, z)``:
        (1, 1). The groups may differ in size."""
        group_to_evaluate = group_train if group_to_evaluate is None else group_to_evaluate
        assert_batched_dataset(group_to_evaluate, "group_to_evaluate")
        vector = self.compute_influence_vector_group(group_train)
        executor = Executor(None, self.verbose, self.memory_budget_bytes)
        test_side, _ = executor.sum(lambda batch: tf.reduce_sum(self._preprocess_samples(batch), axis=0,
                                                                keepdims=True), group_to_evaluate, None,
                                    "group_to_evaluate")
        return self._estimate_influence_value_from_influence_vector(test_side, vector)

    def _pairwise_matrix(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset) -> tf.Tensor:
        return self._streamed_matrix(dataset_to_evaluate, train_set)

    def _index_configuration(self) -> Dict[str, Any]:
        """What the training-side vectors ``w_s(z) φ_s(z)`` depend on besides the weights: not λ, which only enters
        the test side (an index serves every damping of the same fit)."""
        return {"projector": self.projector.configuration(), "reweight": self.reweight, "models": len(self.models)}
