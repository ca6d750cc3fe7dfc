r"""TRAK (Park et al. 2023): influence from randomly projected gradients and their kernel, over model ensembles."""
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ..common.base_influence import BaseInfluenceCalculator
from ..common.executor import first_dim
from ..common.gradient_projector import GradientProjector
from ..common.index_format import atomic_write, calculator_fingerprint
from ..common.ihvp_base import check_regularization, default_rcond
from ..common.memory import DEFAULT_MEMORY_BUDGET_BYTES
from ..common.model_wrappers import BaseInfluenceModel, assert_finite
from ..utils.linear_algebra import lower_cholesky, symmetric_eigh
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


def _check_solve_dtype(solve_dtype: Optional[tf.DType], default: Optional[tf.DType]) -> tf.DType:
    """``solve_dtype`` (None: ``default``, the models' dtype) as float32 or float64; ``ValueError`` otherwise."""
    dtype = tf.as_dtype(solve_dtype or default or tf.float64)
    if dtype not in (tf.float32, tf.float64):
        raise ValueError(f"solve_dtype must be float32 or float64, got {dtype.name}.")
    return dtype


def _cholesky(matrix: np.ndarray, dtype: np.dtype) -> Optional[np.ndarray]:
    """The lower Cholesky factor of a float64 matrix computed in ``dtype`` (float32 falls back to float64 when it
    fails), or None when the matrix is not positive definite."""
    for chosen in dict.fromkeys((np.dtype(dtype), np.dtype(np.float64))):
        try:
            factor = lower_cholesky(matrix.astype(chosen))
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(factor)):
            return factor
    return None


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
    gradients, never more than a batch of them held, plus the N × M · d influence vectors when they fit a quarter
    of ``memory_budget_bytes``: scores against the same ``train_set`` object reuse them), then one Cholesky
    factorisation per model (d³/3 operations, in ``solve_dtype``: at d = 2,048 on 2 CPU cores 0.11-0.18 s in float64,
    less in float32; with λ = 0, an eigendecomposition in float64 for the pseudo-inverse, 0.9 s).
    ``with_regularization`` re-damps without another pass.

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
    solve_dtype
        dtype of the kernels' Cholesky factors and solves (the Gram matrices are always summed in float64): None
        (default) the models' dtype, or ``tf.float32`` / ``tf.float64``. In float32 the scores differ from float64
        ones by about 1e-6 relative at the default damping (1.0e-6 at most on the digits MLP, d = 2,048), far below
        the projection's own noise (two projection seeds agree with Pearson 0.90 there); a kernel that float32 cannot
        factorise is factorised in float64.

    Raises
    ------
    ValueError
        No model, models of different dtypes, a negative or non-finite λ, an unknown ``reweight``, an unbatched or
        empty ``train_set``, non-finite projected gradients, kernels larger than ``memory_budget_bytes``, a
        ``solve_dtype`` other than float32/float64.
    """

    def __init__(self, models: Sequence[BaseInfluenceModel], train_set: tf.data.Dataset,
                 projector: Optional[GradientProjector] = None, regularization: float = 0.0,
                 damping_heuristic: Optional[float] = 0.1, reweight: Optional[str] = None,
                 verbose: Optional[bool] = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                 solve_dtype: Optional[tf.DType] = None):
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
        self.solve_dtype = _check_solve_dtype(solve_dtype, self.dtype)
        self._fit_set: Optional[tf.data.Dataset] = train_set
        self._fit_vectors: Optional[tf.Tensor] = None
        self._grams: List[np.ndarray] = self._fit(train_set)
        self._solvers = self._kernel_solvers()

    # Fit ----------------------------------------------------------------------------------------------------------
    def _fit(self, train_set: tf.data.Dataset) -> List[np.ndarray]:
        """The mean Gram matrix ``Φ_sᵀ Φ_s / N`` (d, d) of every model, float64 (each batch's product in the features'
        dtype, the sum over batches in float64). The training set's influence
        vectors are kept (:attr:`_fit_vectors`, N × M · d) when they fit a quarter of ``memory_budget_bytes``: the
        scores against the same ``train_set`` then do not project its gradients again."""
        executor = self._streaming_executor()
        first = next(iter(executor.batches(train_set.take(1), name="train_set")), None)
        if first is None:
            raise ValueError("train_set is empty.")
        grams, kept, held = [], [], 0
        for position, model in enumerate(self.models):
            dim = self.projector.output_dim_for(model, first)
            if 3 * dim * dim * 8 > self.memory_budget_bytes:
                raise ValueError(f"The {dim} x {dim} kernel of TRAK (with its factorisation, "
                                 f"{3 * dim * dim * 8 / 2 ** 30:.1f} GiB) exceeds memory_budget_bytes="
                                 f"{self.memory_budget_bytes}: lower the projector's output_dim or raise the budget.")
            total, count, vectors = None, 0, []
            def projected(samples: Tuple, model: BaseInfluenceModel = model) -> Tuple:
                features = self.projector.project_batch(model, samples)
                weight = self._weight(model, samples)
                return features, (features if weight is None else weight * features)

            for batch in executor.batches(train_set, f"TRAK kernel ({position + 1}/{len(self.models)})", "train_set"):
                features, weighted = executor.apply(projected, batch)
                features = _finite(features, "projected gradients")
                # each batch's ΦᵀΦ in the features' dtype (float32: ~1e-7 relative per entry), summed in float64
                part = tf.cast(tf.matmul(features, features, transpose_a=True), tf.float64)
                total = part if total is None else total + part
                count += first_dim(batch)
                if vectors is not None:
                    vectors.append(weighted)
                    held += int(np.prod(features.shape)) * features.dtype.size
                    if held > self.memory_budget_bytes // 4:
                        vectors = None
            grams.append(total.numpy() / count)
            kept.append(None if vectors is None else tf.concat(vectors, axis=0))
        if all(part is not None for part in kept):
            self._fit_vectors = kept[0] if len(kept) == 1 else tf.concat(kept, axis=1)
        return grams

    def _damping(self, gram: np.ndarray) -> float:
        """λ of one model: ``regularization`` (+ ``damping_heuristic`` × the mean eigenvalue, ``trace / d``)."""
        damping = self.regularization
        if self.damping_heuristic is not None:
            damping += self.damping_heuristic * float(np.trace(gram)) / len(gram)
        return damping

    def _kernel_solvers(self) -> List[Tuple[str, tf.Tensor]]:
        """How ``K_s⁻¹`` is applied, per model: ``("cholesky", L)`` with ``K_s = L Lᵀ`` when λ > 0 (d³/3 operations,
        ten times cheaper than an eigendecomposition), else ``("inverse", K_s⁺)`` the pseudo-inverse (eigenvalues at
        or below ``default_rcond`` times the largest dropped); float64."""
        solvers = []
        for gram in self._grams:
            damping = self._damping(gram)
            if damping > 0:
                factor = _cholesky(gram + damping * np.eye(len(gram)), self.solve_dtype.as_numpy_dtype)
                if factor is not None:
                    solvers.append(("cholesky", tf.constant(factor)))
                    continue
            values, vectors = symmetric_eigh(tf.constant(gram))
            values, vectors = values.numpy(), vectors.numpy()
            damped = np.maximum(values, 0.0) + damping
            cut = default_rcond(len(gram), tf.float64) * float(np.abs(values).max())
            inverse_values = np.where(damped > cut, 1.0 / np.maximum(damped, cut), 0.0)
            solvers.append(("inverse", tf.constant((vectors * inverse_values[None, :]) @ vectors.T)))
        return solvers

    def _apply_inverse(self, features: tf.Tensor, solver: Tuple[str, tf.Tensor]) -> tf.Tensor:
        """``K_s⁻¹ φ`` for rows φ: (B, d) -> (B, d), solved in the factor's dtype (``solve_dtype``; the
        pseudo-inverse in float64), returned in the models' dtype."""
        kind, matrix = solver
        wide = tf.cast(features, matrix.dtype)
        if kind == "cholesky":
            solved = tf.transpose(tf.linalg.cholesky_solve(matrix, tf.transpose(wide)))
        else:
            solved = tf.matmul(wide, matrix)
        return tf.cast(solved, self.dtype)

    @property
    def dampings(self) -> List[float]:
        """λ of every model (with the heuristic's part)."""
        return [self._damping(gram) for gram in self._grams]

    def with_regularization(self, regularization: float, damping_heuristic: Optional[float] = None) -> "TRAK":
        """A TRAK on the same fitted kernels with another λ (no pass over the data)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.regularization = check_regularization(regularization)
        copy.damping_heuristic = None if damping_heuristic is None else check_regularization(damping_heuristic)
        copy._solvers = copy._kernel_solvers()  # pylint: disable=protected-access
        return copy

    # Saving the fit -----------------------------------------------------------------------------------------------
    def _settings(self) -> Dict[str, Any]:
        return {"projector": self.projector.configuration(), "reweight": self.reweight,
                "regularization": self.regularization, "damping_heuristic": self.damping_heuristic,
                "models": len(self.models)}

    def save(self, path: str) -> None:
        """Save the fitted kernels (the Gram matrices, d² floats per model) and the settings to ``path``
        (a ``.npz`` file, written atomically), so that another process answers without a pass over the training
        set: :meth:`load`."""
        arrays = {"settings": np.asarray(json.dumps(self._settings(), sort_keys=True)),
                  "fingerprint": np.asarray(calculator_fingerprint(self)[0])}
        for position, gram in enumerate(self._grams):
            arrays[f"gram_{position}"] = gram
        directory, name = os.path.split(os.path.abspath(os.fspath(path)))
        atomic_write(directory, name, lambda stream: np.savez(stream, **arrays))

    @classmethod
    def load(cls, path: str, models: Sequence[BaseInfluenceModel], verbose: Optional[bool] = None,
             memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, solve_dtype: Optional[tf.DType] = None
             ) -> "TRAK":
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
            grams = [archive[f"gram_{position}"] for position in range(settings["models"])]
        trak = object.__new__(cls)
        models = [models] if isinstance(models, BaseInfluenceModel) else list(models)
        trak.models, trak.dtype = models, models[0].dtype if models else None
        trak.projector = GradientProjector(**{key: value for key, value in settings["projector"].items()
                                              if key != "block_rows"})
        trak.regularization, trak.damping_heuristic = settings["regularization"], settings["damping_heuristic"]
        trak.reweight, trak.verbose, trak.memory_budget_bytes = settings["reweight"], verbose, int(memory_budget_bytes)
        trak.solve_dtype = _check_solve_dtype(solve_dtype, trak.dtype)
        trak._grams, trak._fit_set, trak._fit_vectors = grams, None, None  # pylint: disable=protected-access
        if len(models) != settings["models"] or calculator_fingerprint(trak)[0] != fingerprint:
            raise ValueError(f"The TRAK fit saved at {path!r} was made with other models ({settings['models']} "
                             "model(s) with other weights or losses): load it with the models it was fitted on.")
        trak._solvers = trak._kernel_solvers()  # pylint: disable=protected-access
        return trak

    # Hooks --------------------------------------------------------------------------------------------------------
    def _features(self, samples: Tuple) -> List[tf.Tensor]:
        """``φ_s`` of every model for a batch: M tensors (B, d)."""
        samples = tuple(samples)
        return [_finite(self.projector.project_batch(model, samples), "projected gradients")
                for model in self.models]

    def _weight(self, model: BaseInfluenceModel, samples: Tuple) -> Optional[tf.Tensor]:
        """``1 - p(z)`` of one model (B, 1), or None without ``reweight``."""
        if self.reweight is None:
            return None
        losses = tf.cast(model.batch_loss_tensor(tuple(samples)), self.dtype)
        weight = -tf.math.expm1(-losses) if self.reweight == "cross_entropy" else tf.sigmoid(losses)
        return weight[:, None]

    def _weights(self, samples: Tuple) -> List[Optional[tf.Tensor]]:
        """``1 - p_s(z)`` of every model (B, 1), or None without ``reweight``."""
        return [self._weight(model, samples) for model in self.models]

    def _compute_influence_vector(self, train_samples: Tuple) -> tf.Tensor:
        """``[w_s(z) φ_s(z)]_s``: (B, M · d)."""
        parts = [features if weight is None else weight * features
                 for features, weight in zip(self._features(train_samples), self._weights(train_samples))]
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def _preprocess_samples(self, samples: Tuple) -> tf.Tensor:
        """``[K_s⁻¹ φ_s(t)]_s / M``: (B_t, M · d)."""
        count = tf.cast(len(self.models), self.dtype)
        parts = [self._apply_inverse(features, solver) / count
                 for features, solver in zip(self._features(samples), self._solvers)]
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: tf.Tensor,
                                                        influence_vector: tf.Tensor) -> tf.Tensor:
        """``I(t, z)`` for every pair: (B_t, B_tr)."""
        return tf.matmul(preproc_test_sample, tf.cast(influence_vector, preproc_test_sample.dtype), transpose_b=True)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Self-influence ``(1/M) Σ_s w_s(z) φ_s(z)ᵀ K_s⁻¹ φ_s(z)``: (B, 1)."""
        train_samples = tuple(train_samples)
        terms = []
        for features, weight, solver in zip(self._features(train_samples), self._weights(train_samples),
                                            self._solvers):
            quadratic = tf.reduce_sum(self._apply_inverse(features, solver) * features, axis=1, keepdims=True)
            terms.append(quadratic if weight is None else weight * quadratic)
        values = tf.add_n(terms) / tf.cast(len(self.models), self.dtype)
        return _finite(values, "self-influence values")

    # Groups -----------------------------------------------------------------------------------------------------
    def compute_influence_vector_group(self, group_train: tf.data.Dataset) -> tf.Tensor:
        """Influence vector of a group of training samples U, ``Σ_{z∈U} v(z)``: (1, M · d) (TRAK is additive: a
        group's influence is the sum of its members')."""
        assert_batched_dataset(group_train, "group_train")
        executor = self._streaming_executor()
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
        executor = self._streaming_executor()
        test_side, _ = executor.sum(lambda batch: tf.reduce_sum(self._preprocess_samples(batch), axis=0,
                                                                keepdims=True), group_to_evaluate, None,
                                    "group_to_evaluate")
        return self._estimate_influence_value_from_influence_vector(test_side, vector)

    def _train_blocks(self, test_side: Any, train_set: tf.data.Dataset, description: str
                      ) -> Iterator[Tuple[tf.Tensor, Tuple]]:
        """The values (T, B) of every training batch; against the ``train_set`` the calculator was fitted on, from
        the influence vectors kept by the fit (no projection again; its batches are only read)."""
        if self._fit_vectors is None or train_set is not self._fit_set:
            yield from super()._train_blocks(test_side, train_set, description)
            return
        start = 0
        for batch in self._streaming_executor().batches(train_set, description, "train_set"):
            rows = first_dim(batch)
            block = self._estimate_influence_value_from_influence_vector(test_side,
                                                                         self._fit_vectors[start:start + rows])
            start += rows
            yield _finite(block, "influence values"), batch

    def _pairwise_matrix(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset) -> tf.Tensor:
        return self._streamed_matrix(dataset_to_evaluate, train_set)

    def _index_configuration(self) -> Dict[str, Any]:
        """What the training-side vectors ``w_s(z) φ_s(z)`` depend on besides the weights: not λ, which only enters
        the test side (an index serves every damping of the same fit)."""
        return {"projector": self.projector.configuration(), "reweight": self.reweight, "models": len(self.models)}
