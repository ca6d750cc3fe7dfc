"""TracIn (Pruthi et al. 2020), checkpoint version TracInCP."""
import itertools
from numbers import Real
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from ..common.base_influence import BaseInfluenceCalculator
from ..common.executor import Executor, first_dim
from ..common.gradient_projector import GradientProjector
from ..common.memory import merged_batch_rows
from ..common.model_wrappers import BaseInfluenceModel, InfluenceModel, assert_finite
from ..utils.tf_operations import default_process_batch
from .factored import factored_tracin_kernels


def _broadcast_learning_rates(learning_rates: Union[float, Sequence[float]], nb_models: int) -> Tuple[float, ...]:
    """A scalar applies to every checkpoint; a list, tuple or 1-D array must hold one rate per checkpoint."""
    if isinstance(learning_rates, (Real, np.floating, np.integer)) and not isinstance(learning_rates, bool):
        rates = (float(learning_rates),) * nb_models
    elif isinstance(learning_rates, (list, tuple, np.ndarray)) or tf.is_tensor(learning_rates):
        rates = tuple(float(rate) for rate in np.asarray(learning_rates, dtype=np.float64).reshape(-1))
        if len(rates) != nb_models:
            raise ValueError(f"learning_rates holds {len(rates)} rates but there are {nb_models} checkpoints (models); "
                             "give one learning rate per checkpoint, or a single number for all of them.")
    else:
        raise TypeError(f"learning_rates must be a number or a list/tuple of numbers, got "
                        f"{type(learning_rates).__name__}.")
    if not all(np.isfinite(rate) and rate >= 0 for rate in rates):
        raise ValueError(f"learning rates must be finite and >= 0, got {rates}.")
    return rates


# Test-side factors smaller than this are recomputed with every training batch rather than held (see
# TracIn._factored_columns).
HELD_FACTORS_MIN_BYTES = 1 << 20


class TracIn(BaseInfluenceCalculator):
    r"""TracInCP: influence as the sum over training checkpoints of learning-rate-weighted gradient products.

    With checkpoints k = 1..K (model weights saved during training), ``lr_k`` the learning rate in use at
    checkpoint k and ``g_k(z)`` the gradient of z's loss w.r.t. the watched weights of checkpoint k (P_k values):

    * influence vector of a training sample z: ``v(z) = [√lr_1 g_1(z), ..., √lr_K g_K(z)]`` of length
      ``D = Σ_k P_k``;
    * test-side representation: the same vector ``v(t)`` for the sample t to evaluate;
    * influence of z on t: ``I(t, z) = <v(t), v(z)> = Σ_k lr_k g_k(t)·g_k(z)``. **Positive**: gradient steps on z
      reduced t's loss (z is a proponent); negative: an opponent;
    * self-influence: ``I(z, z) = Σ_k lr_k ||g_k(z)||²`` (≥ 0), shape (B, 1).

    Parameters
    ----------
    models
        One :class:`InfluenceModel` per checkpoint. Checkpoints may watch different layers (``P_k`` may differ),
        since training-side and test-side vectors are always built from the same checkpoint; they must share a
        floating dtype.
    learning_rates
        A number (applied to every checkpoint) or a list/tuple with one learning rate per checkpoint.
    projector
        Optional :class:`~deel.influenciae.common.GradientProjector`: every ``g_k`` is replaced by its random
        projection ``P g_k`` (d values, the same projection for every checkpoint), so that influence vectors hold
        K · d values instead of Σ_k P_k and every value above is an unbiased estimate of the unprojected one
        (Captum's ``TracInCPFastRandProj``, TRAK's featurisation). None (default): exact gradients.

    Raises
    ------
    ValueError
        Empty ``models``, a number of learning rates different from the number of checkpoints, a negative or
        non-finite rate, checkpoints of different dtypes, or a checkpoint whose watched weights hold NaN or inf.
    """

    def __init__(self, models: Sequence[BaseInfluenceModel], learning_rates: Union[float, Sequence[float]],
                 projector: Optional[GradientProjector] = None):
        if isinstance(models, BaseInfluenceModel):
            models = [models]
        models = list(models)
        if not models:
            raise ValueError("TracIn needs at least one checkpoint (models is empty).")
        for position, model in enumerate(models):
            if not isinstance(model, BaseInfluenceModel):
                raise TypeError(f"models[{position}] must be an InfluenceModel, got {type(model).__name__}.")
        dtypes = {model.dtype for model in models}
        if len(dtypes) != 1:
            raise ValueError(f"All checkpoints must watch weights of one dtype, got {sorted(d.name for d in dtypes)}.")
        self.models = models
        self._check_checkpoint_weights()
        self.learning_rates = _broadcast_learning_rates(learning_rates, len(models))
        self.dtype = dtypes.pop()
        self._scales = [tf.constant(np.sqrt(rate), self.dtype) for rate in self.learning_rates]
        self._scales_vector = tf.constant(np.sqrt(self.learning_rates), self.dtype)
        self._rates = tf.constant(self.learning_rates, self.dtype)
        if projector is not None and not isinstance(projector, GradientProjector):
            raise TypeError(f"projector must be a GradientProjector or None, got {type(projector).__name__}.")
        self.projector = projector
        # The factored products are exact inner products: with a projection every product uses projected vectors.
        self._factored = factored_tracin_kernels(models) if projector is None else None
        self.nb_params = sum(model.nb_params for model in models)

    @classmethod
    def from_models_saver(cls, saver, loss_function: Callable, start_layer=None, last_layer=None,
                          process_batch_for_loss_fn: Callable = default_process_batch,
                          projector: Optional[GradientProjector] = None) -> "TracIn":
        """Build TracIn from the checkpoints collected by a :class:`~deel.influenciae.trac_in.ModelsSaver`.

        Every checkpoint is wrapped as ``InfluenceModel(model, start_layer, last_layer, loss_function,
        process_batch_for_loss_fn)``; the learning rates are those the saver recorded; ``projector`` as in the
        constructor.
        """
        models, learning_rates = saver.checkpoints()
        influence_models = [InfluenceModel(model, start_layer=start_layer, last_layer=last_layer,
                                           loss_function=loss_function,
                                           process_batch_for_loss_fn=process_batch_for_loss_fn) for model in models]
        return cls(influence_models, learning_rates, projector)

    def _check_checkpoint_weights(self) -> None:
        """Raise ``ValueError`` naming the first checkpoint whose watched weights hold NaN or inf."""
        for position, model in enumerate(self.models):
            bad = [variable.path for variable in model.weights
                   if not bool(tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(variable.value))))]
            if bad:
                raise ValueError(f"Checkpoint {position} (models[{position}]) has non-finite (NaN or inf) watched "
                                 f"weights {bad}: its gradients, and every TracIn value, would be NaN. Reload this "
                                 "checkpoint's weights or leave it out (with its learning rate).")

    def _check_finite(self, values: tf.Tensor, what: str, samples: Optional[Tuple] = None) -> tf.Tensor:
        """Return eager ``values`` when finite; otherwise raise ``ValueError`` naming the checkpoint at fault
        (non-finite weights, or non-finite gradients on ``samples``) when one can be found."""
        if not tf.executing_eagerly() or bool(tf.reduce_all(tf.math.is_finite(values))):
            return values
        self._check_checkpoint_weights()
        for position, model in enumerate([] if samples is None else self.models):
            if not bool(tf.reduce_all(tf.math.is_finite(model.batch_jacobian_tensor(samples)))):
                raise ValueError(f"Checkpoint {position} (models[{position}]) gives non-finite (NaN or inf) "
                                 "gradients on these samples although its weights are finite: check its loss "
                                 "(e.g. log(0) with from_logits=False) and the samples' targets.")
        assert_finite(values, what)
        return values

    def _checkpoint_gradients(self, samples: Tuple) -> List[tf.Tensor]:
        """Per-sample gradients of every checkpoint (unscaled): K tensors (B, P_k), or their projections (B, d).
        Each checkpoint's compiled kernel belongs to its InfluenceModel, so new TracIn objects on the same models
        trace nothing."""
        if self.projector is not None:
            return [self.projector.project_batch(model, samples) for model in self.models]
        return [model.batch_jacobian_tensor(samples) for model in self.models]

    def _factored_columns(self, test_batches: List[Tuple], train_set: tf.data.Dataset) -> Optional[List[tf.Tensor]]:
        """The (N_test, B) blocks of the pairwise matrix, one per training batch (consecutive small batches merged,
        see :meth:`_merged_rows`), from factored per-layer gradients; None when the checkpoints' structure is not
        supported."""
        if self._factored is None:
            return None
        if not all(self._factored.usable(tuple(test_batch)) for test_batch in test_batches):
            return None

        executor = self._streaming_executor()
        largest_test = max(first_dim(test_batch) for test_batch in test_batches)
        train_batches = executor.batches(train_set, "influence matrix",
                                         merge_rows=max(self._merged_rows(executor) - largest_test, 0))
        # One training call: the test factors are computed inside it. Several: held for the pass when they fit.
        first_two = list(itertools.islice(train_batches, 2))
        held = None
        if len(first_two) > 1:
            held = self._held_test_factors(test_batches, executor.memory_budget_bytes // 4)

        def block(batch: Tuple) -> tf.Tensor:
            if held is not None:
                blocks = [self._factored.pairwise_with_held(factors, batch, self._rates) for factors in held]
            else:
                blocks = [self._factored.pairwise(test_batch, batch, self._rates) for test_batch in test_batches]
            return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=0)

        return [executor.apply(block, batch, axis=1) for batch in itertools.chain(first_two, train_batches)]

    def _merged_rows(self, executor: Executor) -> int:
        """Up to how many samples consecutive training batches are merged into one call over every checkpoint
        (:func:`~deel.influenciae.common.memory.merged_batch_rows`: only on models small enough for dispatch to
        dominate; 0 when the checkpoints' layer outputs are unknown)."""
        return merged_batch_rows([model.model for model in self.models], executor.memory_budget_bytes)

    def _held_test_factors(self, test_batches: List[Tuple], budget: int) -> Optional[List[Tuple]]:
        """The test batches' factors, computed once to be held for a pass when they take at most ``budget`` bytes;
        None (recompute them with every training batch) above it, or below ``HELD_FACTORS_MIN_BYTES``, where
        recomputing costs less than passing them to every call (a last layer's factors on the digits MLP: 3.7
        against 4.0 ms per batch). Their size is known beforehand when no dimension depends on the values."""
        per_sample = self._factored.held_bytes_per_sample(test_batches[0])
        if per_sample is not None:
            expected = per_sample * sum(first_dim(test_batch) for test_batch in test_batches)
            if not HELD_FACTORS_MIN_BYTES <= expected <= budget:
                return None
            return [self._factored.held_test_factors(test_batch) for test_batch in test_batches]
        held, held_bytes = [], 0  # sizes known only once computed
        for test_batch in test_batches:
            factors = self._factored.held_test_factors(test_batch)
            held_bytes += sum(int(tf.size(tensor)) * tensor.dtype.size for tensor in tf.nest.flatten(factors)
                              if tensor is not None)
            if held_bytes > budget:
                return None
            held.append(factors)
        return held if held_bytes >= HELD_FACTORS_MIN_BYTES else None

    def _pairwise_block(self, test_gradients: List[tf.Tensor], train_samples: Tuple) -> tf.Tensor:
        """``Σ_k lr_k g_k(t)·g_k(z)`` for the test gradients of every checkpoint and a training batch: (B_t, B)."""
        return tf.add_n([tf.matmul(tf.cast(rate, self.dtype) * test, train, transpose_b=True)
                         for rate, test, train in zip(self.learning_rates, test_gradients,
                                                      self._checkpoint_gradients(train_samples))])

    def _self_values(self, samples: Tuple) -> tf.Tensor:
        """``Σ_k lr_k ||g_k(z)||²``: (B,)."""
        factored = None if self._factored is None else self._factored.squared_norms(samples, self._rates)
        if factored is not None:
            return factored
        return tf.add_n([tf.cast(rate, self.dtype) * tf.reduce_sum(tf.square(gradients), axis=1)
                         for rate, gradients in zip(self.learning_rates, self._checkpoint_gradients(samples))])

    def _pairwise_matrix(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset) -> tf.Tensor:
        """All pairwise values ``Σ_k lr_k g_k(t)·g_k(z)`` as one matrix (N_test, N_train).

        The test gradients of every checkpoint are computed once; each training batch then costs its gradients at
        every checkpoint and their products with the test gradients, without building the concatenated
        (B, Σ_k P_k) influence vectors.

        Raises
        ------
        ValueError
            If a dataset is not batched or empty, or a value is not finite.
        """
        executor = self._streaming_executor()
        test_batches = list(executor.batches(dataset_to_evaluate))
        if not test_batches:
            raise ValueError("dataset_to_evaluate is empty.")
        columns = self._factored_columns(test_batches, train_set)
        if columns is None:  # a checkpoint's structure is not supported (rows not one per sample)
            test_gradients = [tf.concat(parts, axis=0)
                              for parts in zip(*[self._checkpoint_gradients(batch) for batch in test_batches])]
            columns = list(executor.map(lambda batch: self._pairwise_block(test_gradients, batch), train_set,
                                        "influence matrix", axis=1))
        if not columns:
            raise ValueError("train_set is empty.")
        values = tf.concat(columns, axis=1)
        return self._check_finite(values, "influence values")

    def _scaled_gradients(self, samples: Tuple) -> tf.Tensor:
        """``[√lr_1 g_1, ..., √lr_K g_K]`` for a batch: (B, Σ_k P_k), formed from factored per-layer gradients
        when the checkpoints' structure allows (one batched product per layer instead of generic per-sample
        gradients)."""
        samples = tuple(samples)
        factored = None if self._factored is None else self._factored.gradients(samples, self._scales_vector)
        if factored is not None:
            return factored
        return tf.concat([scale * gradients for gradients, scale in zip(self._checkpoint_gradients(samples),
                                                                         self._scales)], axis=1)

    def _compute_influence_vector(self, train_samples: Tuple) -> tf.Tensor:
        """Influence vectors ``v(z)``: (B, Σ_k P_k)."""
        return self._scaled_gradients(train_samples)

    def _preprocess_samples(self, samples: Tuple) -> tf.Tensor:
        """Test-side vectors ``v(t)`` (same construction as the influence vectors): (B_t, Σ_k P_k)."""
        return self._scaled_gradients(samples)

    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: tf.Tensor,
                                                        influence_vector: tf.Tensor) -> tf.Tensor:
        """``Σ_k lr_k g_k(t)·g_k(z)`` for every pair: (B_t, B_tr)."""
        return tf.matmul(preproc_test_sample, tf.cast(influence_vector, preproc_test_sample.dtype), transpose_b=True)

    def _estimate_individual_influence_values_from_batch(self, train_samples: Tuple,
                                                         samples_to_evaluate: Tuple) -> tf.Tensor:
        """``Σ_k lr_k g_k(t)·g_k(z)`` for a test batch and a training batch: (B_t, B_tr), from factored
        gradients when possible."""
        factored = None if self._factored is None else self._factored.pairwise(
            tuple(samples_to_evaluate), tuple(train_samples), self._rates)
        if factored is not None:
            return factored
        return super()._estimate_individual_influence_values_from_batch(train_samples, samples_to_evaluate)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        """Self-influence ``Σ_k lr_k ||g_k(z)||²``: (B, 1)."""
        return self._check_finite(self._self_values(tuple(train_samples))[:, None], "self-influence values",
                                  tuple(train_samples))

    def checkpoint_values(self, samples_to_evaluate: Tuple, train_samples: Tuple,
                          checkpoint: Optional[int] = None) -> tf.Tensor:
        """Contribution ``lr_k g_k(t)·g_k(z)`` of one checkpoint (or all, summed, when ``checkpoint`` is None)
        for a test batch and a training batch: (B_t, B_tr)."""
        if checkpoint is None:
            return self._estimate_individual_influence_values_from_batch(tuple(train_samples),
                                                                         tuple(samples_to_evaluate))
        model, scale = self.models[checkpoint], self._scales[checkpoint]
        if self.projector is not None:
            test = self.projector.project_batch(model, tuple(samples_to_evaluate))
            train = self.projector.project_batch(model, tuple(train_samples))
        else:
            test = model.batch_jacobian_tensor(tuple(samples_to_evaluate))
            train = model.batch_jacobian_tensor(tuple(train_samples))
        return scale * scale * tf.matmul(test, train, transpose_b=True)

    def _index_configuration(self) -> dict:
        """What the influence vectors depend on besides the weights: the learning rates and the projection."""
        return {"learning_rates": list(self.learning_rates),
                "projector": None if self.projector is None else self.projector.configuration()}
