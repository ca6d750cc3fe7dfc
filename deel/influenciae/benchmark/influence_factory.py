"""Factories that build a self-influence calculator once the benchmark has trained a model (SPEC §3.18).

Every factory holds a method's settings and implements
``build(training_dataset, model, train_info) -> SelfInfluenceCalculator``: ``training_dataset`` is the batched
(noisy) training set, ``model`` the trained Keras classifier (logits output) and ``train_info`` what the training
procedure returned besides the model (TracIn needs its checkpoints).
"""
import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf

from ..boundary_based import SampleBoundaryCalculator, WeightsBoundaryCalculator
from ..common.base_influence import SelfInfluenceCalculator
from ..common.model_wrappers import InfluenceModel, check_unreduced_loss
from ..common.solver_registry import SolverConfig, build_solver, default_config, solver_entry, solver_names
from ..influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator
from ..rps import RepresenterPointL2, RepresenterPointLJE
from ..trac_in import TracIn

LISSA_DAMPING = 1e-4
LISSA_SCALE = 5.0
# Settings of one solver that differ from the registry's defaults: LiSSA as the reference's benchmark.
SOLVER_SETTINGS: Dict[str, Dict[str, Any]] = {"lissa": {"damping": LISSA_DAMPING, "scale": LISSA_SCALE}}

IhvpMode = Union[str, SolverConfig]


def default_loss() -> keras.losses.Loss:
    """Per-sample categorical cross-entropy on logits, the loss of the benchmark's models."""
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def ihvp_modes() -> Tuple[str, ...]:
    """The solvers an influence-function factory accepts as ``ihvp_mode``: the registry's names."""
    return solver_names()


def _check_ihvp_mode(ihvp_mode: IhvpMode) -> Tuple[str, Optional[SolverConfig]]:
    """The registered name of a solver and, when ``ihvp_mode`` is a configuration, that configuration."""
    if isinstance(ihvp_mode, SolverConfig):
        return ihvp_mode.name, ihvp_mode
    try:
        return solver_entry(str(ihvp_mode)).name, None
    except ValueError:
        raise ValueError(f"ihvp_mode must be one of {ihvp_modes()} or a SolverConfig, got {ihvp_mode!r}.") from None


def _batch_size_of(dataset: tf.data.Dataset) -> int:
    """Size of the first batch of a batched dataset."""
    for batch in dataset.take(1):
        return int(tf.shape(tf.nest.flatten(batch)[0])[0])
    raise ValueError("training_dataset is empty.")


def hessian_subset(training_dataset: tf.data.Dataset, dataset_hessian_size: int) -> tf.data.Dataset:
    """The first ``dataset_hessian_size`` **samples** of a batched dataset, read once and kept in memory.

    ``-1`` (or None, or any size <= 0) returns ``training_dataset`` itself: the mean Hessian over all the samples
    does not depend on their order. Materialising a subset makes it the same at every pass, even when
    ``training_dataset`` reshuffles at each iteration.

    Returns
    -------
    tf.data.Dataset
        Batched with the batch size of ``training_dataset``.
    """
    if dataset_hessian_size is None or int(dataset_hessian_size) <= 0:
        return training_dataset
    batch_size = _batch_size_of(training_dataset)
    samples = training_dataset.unbatch().take(int(dataset_hessian_size))
    columns = list(samples.batch(4096).as_numpy_iterator())
    stacked = tuple(tf.concat([tf.convert_to_tensor(part[i]) for part in columns], axis=0)
                    for i in range(len(columns[0])))
    return tf.data.Dataset.from_tensor_slices(stacked).batch(batch_size)


def _tracin_checkpoints(train_info: Any) -> Tuple[List[keras.Model], List[float]]:
    """``(models, learning_rates)`` from a training procedure's ``train_info``."""
    if train_info is None:
        raise ValueError("TracIn needs checkpoints: the training procedure must return train_info = (models, "
                         "learning_rates) (e.g. DigitsTrainingProcedure(epochs_to_save=[...])).")
    if hasattr(train_info, "checkpoints"):  # a ModelsSaver
        return train_info.checkpoints()
    if isinstance(train_info, dict):
        train_info = (train_info["models"], train_info["learning_rates"])
    models, rates = train_info
    models = list(models)
    if not models:
        raise ValueError("TracIn needs at least one checkpoint; train_info holds none.")
    return models, list(rates)


class InfluenceCalculatorFactory(ABC):
    """Builds a self-influence calculator for a trained model."""

    @abstractmethod
    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any
              ) -> SelfInfluenceCalculator:
        """Return a calculator for ``model`` trained on ``training_dataset`` (batched ``(x, y)``).

        Parameters
        ----------
        training_dataset
            Batched (noisy) training dataset.
        model
            The trained classifier (logits output).
        train_info
            What the training procedure returned besides the model.
        """


class _InfluenceFunctionFactory(InfluenceCalculatorFactory, ABC):
    """Settings shared by the factories that build an influence-function solver (first order, RPS-LJE)."""

    def __init__(self, ihvp_mode: IhvpMode, start_layer: Union[int, str], dataset_hessian_size: int,
                 n_opt_iters: int, feature_extractor: Union[int, str], loss_function: Optional[Callable],
                 regularization: float):
        self.ihvp_mode, self.ihvp_config = _check_ihvp_mode(ihvp_mode)
        self.start_layer = start_layer
        self.dataset_hessian_size = int(dataset_hessian_size)
        self.n_opt_iters = int(n_opt_iters)
        self.feature_extractor = feature_extractor
        self.loss_function = default_loss() if loss_function is None else loss_function
        check_unreduced_loss(self.loss_function)
        self.regularization = float(regularization)

    def solver_config(self) -> SolverConfig:
        """The configuration of the solver (:mod:`~deel.influenciae.common.solver_registry`).

        A configuration given as ``ihvp_mode`` is used as it is. A name gives the registry's defaults with this
        factory's ``regularization`` and, where the configuration has the field, ``n_opt_iters``, the head's first
        layer ``extractor_layer = feature_extractor`` and the benchmark's own settings (LiSSA: damping 1e-4,
        scale 5, as the reference).
        """
        if self.ihvp_config is not None:
            return self.ihvp_config
        config = default_config(self.ihvp_mode, self.regularization)
        settings = {"n_opt_iters": self.n_opt_iters, "extractor_layer": self.feature_extractor,
                    **SOLVER_SETTINGS.get(self.ihvp_mode, {})}
        fields = {field.name for field in dataclasses.fields(config)}
        return config.replace(**{name: value for name, value in settings.items() if name in fields})


class FirstOrderFactory(_InfluenceFunctionFactory):
    """:class:`~deel.influenciae.influence.FirstOrderInfluenceCalculator` (self-influence ``g(z)ᵀ H⁻¹ g(z)``).

    Parameters
    ----------
    ihvp_mode
        A registered solver (:func:`~deel.influenciae.common.solver_names`: ``'exact'``, ``'cgd'``, ``'lissa'``,
        ``'arnoldi'``; LiSSA with damping 1e-4 and scale 5, as the reference) or a solver configuration such as
        ``ConjugateGradientConfig(regularization=1e-2, n_opt_iters=50)`` (see :meth:`solver_config`).
    start_layer
        First watched layer of the :class:`InfluenceModel` (default -1: the last layer).
    dataset_hessian_size
        Number of training **samples** (the first ones of the shuffled training set) over which the Hessian is
        averaged; -1: all of them.
    n_opt_iters
        Iterations of the iterative solvers (CGD, LiSSA).
    feature_extractor
        Index or name of the first layer of the head for CGD / LiSSA (their ``extractor_layer``).
    loss_function
        Per-sample loss (default: categorical cross-entropy on logits).
    regularization
        λ ≥ 0: ``(H + λI)⁻¹`` (damping; useful when H is singular or not positive definite); a configuration given
        as ``ihvp_mode`` keeps its own.
    normalize
        RelatIF normalisation of the influence vectors.
    """

    def __init__(self, ihvp_mode: IhvpMode = "exact", start_layer: Union[int, str] = -1,
                 dataset_hessian_size: int = -1, n_opt_iters: int = 100, feature_extractor: Union[int, str] = -1,
                 loss_function: Optional[Callable] = None, regularization: float = 0.0, normalize: bool = False):
        super().__init__(ihvp_mode, start_layer, dataset_hessian_size, n_opt_iters, feature_extractor, loss_function,
                         regularization)
        self.normalize = bool(normalize)

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any
              ) -> FirstOrderInfluenceCalculator:
        influence_model = InfluenceModel(model, start_layer=self.start_layer, loss_function=self.loss_function)
        hessian_set = hessian_subset(training_dataset, self.dataset_hessian_size)
        ihvp = build_solver(self.solver_config(), influence_model, hessian_set)
        return FirstOrderInfluenceCalculator(influence_model, training_dataset, ihvp_calculator=ihvp,
                                             normalize=self.normalize)


class ArnoldiCalculatorFactory(InfluenceCalculatorFactory):
    """:class:`~deel.influenciae.influence.ArnoldiInfluenceCalculator` (Schioppa et al. 2022).

    Parameters
    ----------
    subspace_dim
        Dimension of the Krylov subspace (capped at the number of watched parameters).
    force_hermitian
        Use the symmetric eigensolver.
    k_largest_eig_vals
        Number of eigenpairs kept (capped at ``subspace_dim``).
    start_layer, dataset_hessian_size, loss_function, regularization
        As :class:`FirstOrderFactory`.
    dtype
        Float dtype of the Arnoldi iteration.
    seed
        Seed of the start vector.
    """

    def __init__(self, subspace_dim: int = 200, force_hermitian: bool = False, k_largest_eig_vals: int = 100,
                 start_layer: Union[int, str] = -1, dataset_hessian_size: int = -1,
                 loss_function: Optional[Callable] = None, dtype: tf.DType = tf.float32, regularization: float = 0.0,
                 seed: Optional[int] = 0):
        self.subspace_dim = int(subspace_dim)
        self.force_hermitian = bool(force_hermitian)
        self.k_largest_eig_vals = int(k_largest_eig_vals)
        self.start_layer = start_layer
        self.dataset_hessian_size = int(dataset_hessian_size)
        self.loss_function = default_loss() if loss_function is None else loss_function
        check_unreduced_loss(self.loss_function)
        self.dtype = tf.as_dtype(dtype)
        self.regularization = float(regularization)
        self.seed = seed

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any
              ) -> ArnoldiInfluenceCalculator:
        influence_model = InfluenceModel(model, start_layer=self.start_layer, loss_function=self.loss_function)
        subspace_dim = min(self.subspace_dim, influence_model.nb_params)
        k_largest = min(self.k_largest_eig_vals, subspace_dim)
        hessian_set = hessian_subset(training_dataset, self.dataset_hessian_size)
        return ArnoldiInfluenceCalculator(influence_model, hessian_set, subspace_dim=subspace_dim,
                                          force_hermitian=self.force_hermitian, k_largest_eig_vals=k_largest,
                                          dtype=self.dtype, regularization=self.regularization, seed=self.seed)


class TracInFactory(InfluenceCalculatorFactory):
    """:class:`~deel.influenciae.trac_in.TracIn` on the checkpoints in ``train_info = (models, learning_rates)``
    (or a :class:`~deel.influenciae.trac_in.ModelsSaver`).

    Parameters
    ----------
    loss_function
        Per-sample loss (default: categorical cross-entropy on logits).
    start_layer, last_layer
        Watched layers of every checkpoint (default None: the last weighted layer before the output, as the
        reference; -1 watches the output layer).
    """

    def __init__(self, loss_function: Optional[Callable] = None, start_layer: Optional[Union[int, str]] = None,
                 last_layer: Optional[Union[int, str]] = None):
        self.loss_function = default_loss() if loss_function is None else loss_function
        check_unreduced_loss(self.loss_function)
        self.start_layer = start_layer
        self.last_layer = last_layer

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any) -> TracIn:
        models, rates = _tracin_checkpoints(train_info)
        influence_models = [InfluenceModel(checkpoint, start_layer=self.start_layer, last_layer=self.last_layer,
                                           loss_function=self.loss_function) for checkpoint in models]
        return TracIn(influence_models, rates)


class RPSL2Factory(InfluenceCalculatorFactory):
    """:class:`~deel.influenciae.rps.RepresenterPointL2` (the model's last layer must be a bias-free Dense).

    Parameters
    ----------
    loss_function
        Per-sample training loss (default: categorical cross-entropy on logits).
    lambda_regularization
        λ > 0 of the surrogate's L2 penalty.
    scaling_factor
        Armijo constant of the line search.
    layer_index
        The features are the input of this layer (default -1: the last Dense; the reference used -2).
    epochs
        Line-search gradient steps.
    surrogate_target
        ``'labels'`` (the paper) or ``'logits'`` (the reference).
    """

    def __init__(self, loss_function: Optional[Callable] = None, lambda_regularization: float = 1e-3,
                 scaling_factor: float = 0.1, layer_index: Union[int, str] = -1, epochs: int = 100,
                 surrogate_target: str = "labels"):
        self.loss_function = default_loss() if loss_function is None else loss_function
        self.lambda_regularization = float(lambda_regularization)
        self.scaling_factor = float(scaling_factor)
        self.layer_index = layer_index
        self.epochs = int(epochs)
        self.surrogate_target = surrogate_target

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any) -> RepresenterPointL2:
        loss = self.loss_function if self.surrogate_target == "labels" else None
        return RepresenterPointL2(model, training_dataset, loss, lambda_regularization=self.lambda_regularization,
                                  scaling_factor=self.scaling_factor, epochs=self.epochs, layer_index=self.layer_index,
                                  surrogate_target=self.surrogate_target)


class RPSLJEFactory(_InfluenceFunctionFactory):
    """:class:`~deel.influenciae.rps.RepresenterPointLJE` (the model's last layer must be a bias-free Dense).

    Parameters
    ----------
    ihvp_mode, dataset_hessian_size, n_opt_iters, feature_extractor, loss_function
        As :class:`FirstOrderFactory` (the Hessian is the last layer's).
    start_layer
        Kept for the reference's signature: LJE always expands the last layer.
    regularization
        λ of the IHVP on the perturbed head.
    """

    def __init__(self, ihvp_mode: IhvpMode = "exact", start_layer: Union[int, str] = -1,
                 dataset_hessian_size: int = -1, n_opt_iters: int = 100, feature_extractor: Union[int, str] = -1,
                 loss_function: Optional[Callable] = None, regularization: float = 0.0):
        super().__init__(ihvp_mode, start_layer, dataset_hessian_size, n_opt_iters, feature_extractor, loss_function,
                         regularization)

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any) -> RepresenterPointLJE:
        influence_model = InfluenceModel(model, start_layer=-1, loss_function=self.loss_function)
        size = self.dataset_hessian_size if self.dataset_hessian_size > 0 else None
        return RepresenterPointLJE(influence_model, training_dataset, ihvp_calculator=self.solver_config(),
                                   n_samples_for_hessian=size)


class WeightsBoundaryCalculatorFactory(InfluenceCalculatorFactory):
    """:class:`~deel.influenciae.boundary_based.WeightsBoundaryCalculator` (DeepFool in weight space)."""

    def __init__(self, step_nbr: int = 100, norm_type: float = 2, eps: float = 1e-6):
        self.step_nbr = int(step_nbr)
        self.norm_type = norm_type
        self.eps = float(eps)

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any
              ) -> WeightsBoundaryCalculator:
        return WeightsBoundaryCalculator(model, step_nbr=self.step_nbr, norm_type=self.norm_type, eps=self.eps)


class SampleBoundaryCalculatorFactory(InfluenceCalculatorFactory):
    """:class:`~deel.influenciae.boundary_based.SampleBoundaryCalculator` (DeepFool in input space)."""

    def __init__(self, step_nbr: int = 100, eps: float = 1e-6):
        self.step_nbr = int(step_nbr)
        self.eps = float(eps)

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any
              ) -> SampleBoundaryCalculator:
        return SampleBoundaryCalculator(model, step_nbr=self.step_nbr, eps=self.eps)


class LossRankingCalculator(SelfInfluenceCalculator):
    """Baseline score: each training sample's own loss ``ℓ(y, f(x))``, (B, 1).

    Not an influence method: it is the reference point a self-influence method should beat at finding
    mislabeled samples (a mislabeled sample the model did not memorise has a high loss).

    Parameters
    ----------
    model
        The trained model.
    loss_function
        Per-sample loss ``loss(y_true, y_pred) -> (B,)``.
    """

    def __init__(self, model: keras.Model, loss_function: Callable):
        check_unreduced_loss(loss_function)
        self.model = model
        self.loss_function = loss_function

    def _compute_influence_value_from_batch(self, train_samples: Sequence) -> tf.Tensor:
        inputs, targets = train_samples[0], train_samples[1]
        losses = self.loss_function(targets, self.model(inputs, training=False))
        return tf.reshape(tf.cast(losses, tf.float32), (-1, 1))


class LossRankingFactory(InfluenceCalculatorFactory):
    """Baseline :class:`LossRankingCalculator`: rank the samples by their training loss."""

    def __init__(self, loss_function: Optional[Callable] = None):
        self.loss_function = default_loss() if loss_function is None else loss_function

    def build(self, training_dataset: tf.data.Dataset, model: keras.Model, train_info: Any) -> LossRankingCalculator:
        return LossRankingCalculator(model, self.loss_function)
