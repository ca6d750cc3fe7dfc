"""Iterative inverse-Hessian-vector products on Hessian-vector products only: conjugate gradients and LiSSA."""
import dataclasses
from typing import Any, Optional, Tuple, Union

import keras
import tensorflow as tf

from ..utils.batch_checks import compute_batches
from ..utils.conjugate_gradients import KrylovBasis, block_conjugate_gradients_solve, conjugate_gradients_solve
from ..utils.progress import LOGGER
from ..utils.tf_operations import dataset_size
from .autodiff import compile_function
from .curvature import CurvatureOperator, HessianOperator
from .gauss_newton import CurvatureSpec, check_curvature, resolve_curvature
from .executor import Executor
from .ihvp_base import InverseHessianVectorProduct, check_regularization
from .memory import DEFAULT_MEMORY_BUDGET_BYTES, structure_bytes
from .model_head import split_for_hvp
from .model_wrappers import BaseInfluenceModel
from .solver_registry import SolverConfig, register_solver


class IterativeIHVP(InverseHessianVectorProduct):
    """Base of the solvers that only need Hessian-vector products (CG, LiSSA).

    The model is cut in two at ``extractor_layer``: the layers below it (which must hold no watched weight)
    are evaluated once per training sample and their outputs cached in memory; every Hessian-vector product
    then only runs the head. All vectors of a batch are solved together.

    Parameters
    ----------
    model
        The influence model.
    extractor_layer
        Index or name (in ``model.model.layers``) of the first layer of the head. Defaults to the first
        watched layer (``model.start_layer_index``), or to the whole model for a :class:`BaseInfluenceModel`.
    train_dataset
        Batched dataset over which the mean Hessian is taken.
    n_opt_iters
        Iterations of the solver.
    feature_extractor
        Optional Keras model computing the head's input from ``x`` (used instead of the automatic split).
    regularization
        λ ≥ 0: solve with ``H + λ I``.
    hvp_batch_size
        Batch size of the cached features for the HVP passes (default: the dataset's first batch size).
    curvature
        ``"hessian"`` (or None, the default): the Hessian of the head over ``train_dataset``; ``"gauss_newton"``: the
        Gauss–Newton matrix of the head over ``train_dataset``
        (:class:`~deel.influenciae.common.gauss_newton.GaussNewtonOperator` on the cached head inputs; positive
        semi-definite for losses convex in the outputs, so CG converges and LiSSA does not diverge for every
        λ > 0); or a curvature operator whose products are used as they are (no cut, no cached features).

    Attributes
    ----------
    memory_budget_bytes : int
        Class attribute (default 4 GiB): the cached head inputs are held in memory only below it; above it they are
        recomputed and streamed on every pass of Hessian-vector products (memory of one batch).
    weights : list
        The watched weights (``model.weights``), as in the reference.
    """

    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES

    def __init__(self, model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]],
                 train_dataset: tf.data.Dataset, n_opt_iters: int = 100,
                 feature_extractor: Optional[keras.Model] = None, regularization: float = 0.0,
                 hvp_batch_size: Optional[int] = None, curvature: CurvatureSpec = None):
        super().__init__(model, train_dataset)
        curvature = check_curvature(curvature)
        if train_dataset is None and not isinstance(curvature, CurvatureOperator):
            raise ValueError(f"{type(self).__name__} needs a train_dataset (or a curvature operator).")
        self._given_curvature = curvature
        if int(n_opt_iters) < 1:
            raise ValueError(f"n_opt_iters must be >= 1, got {n_opt_iters}.")
        self.n_opt_iters = int(n_opt_iters)
        self.regularization = check_regularization(regularization)
        self.weights = model.weights
        if extractor_layer is None:
            extractor_layer = getattr(model, "start_layer_index", None)
        self.extractor_layer = extractor_layer
        extractor, self.head_model = split_for_hvp(model, extractor_layer)
        if feature_extractor is not None:
            extractor = feature_extractor
        self.feature_extractor = extractor
        self.hvp_batch_size = hvp_batch_size
        self._solve = compile_function(self._solve_eager)
        # Set by the fit.
        self.feature_dataset = self.curvature = self.hessian_vector_product = self._batch_shape = None

    def _fit(self) -> None:
        """Cache the head's inputs over the training set and build the curvature operator of the head (Hessian or
        Gauss–Newton); a given curvature operator is used as it is."""
        if isinstance(self._given_curvature, CurvatureOperator):
            self.curvature = self._given_curvature
            self.hessian_vector_product = self.curvature.matvec
            return
        self.feature_dataset = self._cache_features(self.train_set, self.hvp_batch_size)
        operator = resolve_curvature(self._given_curvature, self.head_model, self.feature_dataset,
                                     memory_budget_bytes=self.memory_budget_bytes, chunk_size=self.hvp_batch_size)
        if operator is not None:
            self.curvature = operator
            self.hessian_vector_product = operator.matvec
            return
        self.curvature = HessianOperator(self.head_model, self.feature_dataset, chunk_size=self.hvp_batch_size,
                                         memory_budget_bytes=self.memory_budget_bytes)
        self.hessian_vector_product = self.curvature.products

    def _redamp(self) -> None:
        """Recompile the solve (λ is a constant of its graph); the cached inputs and the operator are kept."""
        self._solve = compile_function(self._solve_eager)

    def _solve_eager(self, vectors: tf.Tensor) -> tf.Tensor:
        """Solver-specific ``(H + λI)⁻¹ V`` (compiled in __init__)."""
        raise NotImplementedError

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        self.fit()
        return self._solve(tf.cast(vectors, self.model.dtype))

    def _features_of(self, batch: Tuple) -> Tuple:
        inputs, targets, sample_weight = self.model.process_batch_for_loss_fn(batch)
        features = inputs if self.feature_extractor is None else self.feature_extractor(inputs, training=False)
        return (features, targets) if sample_weight is None else (features, targets, sample_weight)

    def _cache_features(self, dataset: tf.data.Dataset, hvp_batch_size: Optional[int]) -> tf.data.Dataset:
        """The head's inputs: held in memory when they fit ``memory_budget_bytes``, else computed per pass."""
        first = next(iter(compute_batches(dataset.take(1))), None)
        if first is None:
            raise ValueError("train_dataset is empty.")
        first_features = self._features_of(tuple(first))
        self._batch_shape = tf.shape(tf.nest.flatten(first_features[0])[0])
        first_size = int(tf.shape(tf.nest.flatten(first_features[1])[0])[0])
        if structure_bytes(first_features) / first_size * dataset_size(dataset) > self.memory_budget_bytes:
            LOGGER.info("The head's inputs of %s are computed on every pass (above memory_budget_bytes=%d).",
                        type(self).__name__, self.memory_budget_bytes)
            return dataset.map(lambda *batch: self._features_of(batch))
        executor = Executor(memory_budget_bytes=self.memory_budget_bytes, strategy=self.model.strategy)
        stacked = tuple(executor.concat(self._features_of, dataset))
        return tf.data.Dataset.from_tensor_slices(stacked).batch(hvp_batch_size or first_size)

    def batch_shape_tensor(self) -> tf.Tensor:
        """Shape of the first batch of cached features."""
        return self._batch_shape

    def damped_hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI) V`` for (P, K) vectors."""
        self.fit()
        product = self.hessian_vector_product(vectors)
        if self.regularization:
            product = product + self.regularization * vectors
        return product

    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        self.fit()
        return self.hessian_vector_product(tf.cast(vectors, self.model.dtype))


class ConjugateGradientDescentIHVP(IterativeIHVP):
    """Inverse-Hessian-vector products by conjugate gradients on mean Hessian-vector products.

    Solves ``(H + λI) x = v`` for all the vectors of a batch at once; each iteration is one pass of
    Hessian-vector products over the cached features. H must be positive definite on the vectors' span for
    CG to converge: use ``regularization > 0`` for non-convex models.

    By default the K vectors of a batch are solved by *block* CG (all columns share one Krylov space, which
    grows by up to K directions per iteration), which needs several times fewer iterations — and Hessian-vector
    products — than K independent CG solves for the same residual; ``block=False`` runs the independent
    column-wise iteration of the reference. With ``recycle_directions > 0`` the search directions of earlier
    solves are kept (up to that many columns of P numbers, twice) and reused by later ones (Krylov subspace
    recycling): solves after the first start from the solution in the kept subspace and only search outside
    it, so a series of batches costs far fewer Hessian-vector products in total. The kept directions are
    A-orthonormal only up to rounding, so the start is computed in two Galerkin passes and a residual left in
    the kept span gets one more pass; in float32 the residuals then stay within about 1.5x ``tol`` (digits MLP,
    P = 2,410, ``tol`` = 1e-6, measured against a float64 Hessian).

    Parameters
    ----------
    model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization, hvp_batch_size
        See :class:`IterativeIHVP`.
    tol, atol
        Stop a column when ``||r|| <= max(tol ||v||, atol)``.
    block
        Block CG over all the vectors of a call (default) instead of independent column-wise CG.
    recycle_directions
        Number of search directions kept between calls (block CG only); 0 disables recycling.
    curvature
        Keyword only; see :class:`IterativeIHVP`.
    fit_now
        Keyword only: cache the head's inputs now (default) or at :meth:`fit` / the first product.
    """

    def __init__(self, model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]] = None,
                 train_dataset: Optional[tf.data.Dataset] = None, n_opt_iters: int = 100,
                 feature_extractor: Optional[keras.Model] = None, regularization: float = 0.0,
                 hvp_batch_size: Optional[int] = None, tol: float = 1e-3, atol: float = 1e-5, block: bool = True,
                 recycle_directions: int = 0, *, curvature: CurvatureSpec = None,
                 fit_now: bool = True):
        super().__init__(model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization,
                         hvp_batch_size, curvature)
        self.tol = float(tol)
        self.atol = float(atol)
        self.block = bool(block)
        if int(recycle_directions) < 0:
            raise ValueError(f"recycle_directions must be >= 0, got {recycle_directions}.")
        if recycle_directions and not self.block:
            raise ValueError("recycle_directions needs block=True.")
        self.krylov_basis = KrylovBasis(int(recycle_directions))
        self.last_solve_info: Optional[dict] = None
        if fit_now:
            self.fit()

    def _redamp(self) -> None:
        """As :class:`IterativeIHVP`, with an empty recycled basis (its directions are A-orthonormal for the old λ)."""
        super()._redamp()
        self.krylov_basis = KrylovBasis(self.krylov_basis.capacity)
        self.last_solve_info = None

    def _solve_eager(self, vectors: tf.Tensor) -> tf.Tensor:
        return conjugate_gradients_solve(self.damped_hvp, vectors, maxiter=self.n_opt_iters, tol=self.tol,
                                         atol=self.atol)

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI)⁻¹ V`` for (P, K) vectors: (P, K). Details of the last block solve (iterations, number of
        Hessian-vector products, residual norms) are kept in ``last_solve_info``. Block CG runs eagerly; inside a
        graph (``tf.function``, ``Dataset.map``) it runs through ``tf.py_function``."""
        vectors = tf.cast(vectors, self.model.dtype)
        self.fit()
        if not self.block:
            return super().apply_inverse(vectors)
        if tf.executing_eagerly():
            return self._block_solve(vectors)
        solution = tf.py_function(self._block_solve, [vectors], Tout=self.model.dtype)
        solution.set_shape(vectors.shape)
        return solution

    def _block_solve(self, vectors: tf.Tensor) -> tf.Tensor:
        solution, self.last_solve_info = block_conjugate_gradients_solve(
            self.damped_hvp, vectors, maxiter=self.n_opt_iters, tol=self.tol, atol=self.atol,
            basis=self.krylov_basis, return_info=True)
        info = self.last_solve_info
        LOGGER.info("Block CG: %d vectors, %d iterations, %s Hessian-vector products, largest residual %.3e",
                    int(vectors.shape[1]), int(info["iterations"]), info.get("operator_columns", "?"),
                    float(tf.reduce_max(info["residual_norm"])) if int(vectors.shape[1]) else 0.0)
        return solution


ConjugateGradientIHVP = ConjugateGradientDescentIHVP


class LissaIHVP(IterativeIHVP):
    """Inverse-Hessian-vector products by the LiSSA iteration (Agarwal et al. 2017).

    Starting from ``x₀ = v`` it repeats ``x ← v + (1 − d)·x − (H + λI)·x / s`` ``n_opt_iters`` times and returns
    ``x / s``. Its fixed point is ``(H + λI + d·s·I)⁻¹ v``; it converges when the eigenvalues of
    ``(H + λI)/s + d`` lie in (0, 2), i.e. ``s`` must exceed the largest eigenvalue of ``H + λI`` and H must be
    positive semi-definite. The error after n iterations decays like ``(1 − d − μ/s)ⁿ`` with μ the smallest
    eigenvalue of ``H + λI``.

    Parameters
    ----------
    model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization, hvp_batch_size
        See :class:`IterativeIHVP`.
    damping
        d, in [0, 1).
    scale
        s > 0.
    curvature
        Keyword only; see :class:`IterativeIHVP`.
    fit_now
        Keyword only: cache the head's inputs now (default) or at :meth:`fit` / the first product.

    Raises
    ------
    ValueError
        From ``apply_inverse`` (and so every IHVP), when the iteration diverges: its iterates become non-finite or
        their steps grow (they never grow when it converges, since each step is the previous one times a matrix
        of norm < 1). The message gives the largest eigenvalue of ``H + λI`` found by power iteration and a
        ``scale`` above it (or a ``regularization`` when H has negative eigenvalues). Inside a graph (e.g.
        ``compute_ihvp``'s ``Dataset.map``) an assertion fails instead.
    """

    GROWTH_LIMIT = 2.0  # divergence: the last step is longer than GROWTH_LIMIT times the first one

    def __init__(self, model: BaseInfluenceModel, extractor_layer: Optional[Union[int, str]] = None,
                 train_dataset: Optional[tf.data.Dataset] = None, n_opt_iters: int = 100,
                 feature_extractor: Optional[keras.Model] = None, damping: float = 1e-4, scale: float = 10.,
                 regularization: float = 0.0, hvp_batch_size: Optional[int] = None, *,
                 curvature: CurvatureSpec = None, fit_now: bool = True):
        if not 0 <= damping < 1:
            raise ValueError(f"damping must be in [0, 1), got {damping}.")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        super().__init__(model, extractor_layer, train_dataset, n_opt_iters, feature_extractor, regularization,
                         hvp_batch_size, curvature)
        self.damping = float(damping)
        self.scale = float(scale)
        self._solve_checked = compile_function(self._iterate)
        if fit_now:
            self.fit()

    def _redamp(self) -> None:
        super()._redamp()
        self._solve_checked = compile_function(self._iterate)

    def _iterate(self, vectors: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """The LiSSA iterates for (P, K) vectors: ``x / s`` (P, K), and whether the iteration stayed finite and its
        steps did not grow (a scalar bool)."""
        def step(iteration, estimate, first_step, _):
            updated = vectors + (1.0 - self.damping) * estimate - self.damped_hvp(estimate) / self.scale
            length = tf.norm(updated - estimate, axis=0)
            return iteration + 1, updated, tf.where(iteration == 0, length, first_step), length

        lengths = tf.zeros(tf.shape(vectors)[1:], vectors.dtype)
        _, estimate, first_step, last_step = tf.while_loop(lambda iteration, *_: iteration < self.n_opt_iters, step,
                                                           (tf.constant(0), vectors, lengths, lengths))
        stable = tf.logical_and(tf.reduce_all(tf.math.is_finite(estimate)),
                                tf.reduce_all(last_step <= self.GROWTH_LIMIT * first_step))
        return estimate / self.scale, stable

    def _solve_eager(self, vectors: tf.Tensor) -> tf.Tensor:
        return self._iterate(vectors)[0]

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI + d·s·I)⁻¹ V`` for (P, K) vectors: (P, K).

        Raises
        ------
        ValueError
            If the iteration diverges (see the class docstring).
        """
        self.fit()
        solution, stable = self._solve_checked(tf.cast(vectors, self.model.dtype))
        if tf.executing_eagerly():
            if not bool(stable):
                raise self._divergence_error()
            return solution
        message = (f"LiSSA diverged: scale={self.scale} must exceed the largest eigenvalue of H + λI (and H + λI "
                   "must be positive semi-definite); call apply_inverse eagerly for a suggested value.")
        with tf.control_dependencies([tf.debugging.Assert(stable, [message])]):
            return tf.identity(solution)

    def _extreme_eigenvalue(self, shift: float = 0.0, iterations: int = 30) -> float:
        """Eigenvalue of ``H + λI - shift·I`` of largest magnitude, by power iteration from a seeded vector."""
        vector = tf.random.stateless_normal((self.model.nb_params, 1), seed=(0, 0), dtype=self.model.dtype)
        value = 0.0
        for _ in range(iterations):
            vector = vector / tf.norm(vector)
            product = self.damped_hvp(vector) - shift * vector
            value = float(tf.reduce_sum(vector * product))
            vector = product
        return value

    def _divergence_error(self) -> ValueError:
        """The error of a diverging iteration, with the eigenvalues that explain it and a suggested setting."""
        largest = self._extreme_eigenvalue()
        lowest = largest + self._extreme_eigenvalue(shift=largest) if largest > 0 else largest
        if lowest < -1e-6 * max(abs(largest), 1e-12):
            return ValueError(
                f"LiSSA diverged: H + λI has a negative eigenvalue (about {lowest:.3g} by power iteration, "
                f"regularization={self.regularization}) and LiSSA needs a positive semi-definite matrix. Raise "
                f"regularization above {-lowest:.2g} (e.g. regularization={self.regularization - 2 * lowest:.2g}) "
                f"and keep scale above the largest eigenvalue (about {largest - 2 * lowest:.3g} then), or use "
                "ExactIHVP / ConjugateGradientDescentIHVP with regularization.")
        return ValueError(
            f"LiSSA diverged (non-finite or growing iterates): scale={self.scale} must exceed the largest eigenvalue "
            f"of H + λI, about {largest:.3g} by power iteration (regularization={self.regularization}). Use a larger "
            f"scale, e.g. scale={float(f'{2 * largest:.2g}'):g}.")


@dataclasses.dataclass(frozen=True)
class ConjugateGradientConfig(SolverConfig):
    """Settings of :class:`ConjugateGradientDescentIHVP` (see its parameters)."""

    n_opt_iters: int = 100
    tol: float = 1e-3
    atol: float = 1e-5
    block: bool = True
    recycle_directions: int = 0
    extractor_layer: Optional[Union[int, str]] = None
    feature_extractor: Optional[Any] = None
    hvp_batch_size: Optional[int] = None
    curvature: CurvatureSpec = "hessian"


@dataclasses.dataclass(frozen=True)
class LissaConfig(SolverConfig):
    """Settings of :class:`LissaIHVP` (see its parameters)."""

    n_opt_iters: int = 100
    damping: float = 1e-4
    scale: float = 10.
    extractor_layer: Optional[Union[int, str]] = None
    feature_extractor: Optional[Any] = None
    hvp_batch_size: Optional[int] = None
    curvature: CurvatureSpec = "hessian"


register_solver("cgd", ConjugateGradientDescentIHVP, ConjugateGradientConfig, aliases=("cg", "conjugate_gradients"),
                description="(block) conjugate gradients on mean Hessian-vector products; needs H + λI > 0")
register_solver("lissa", LissaIHVP, LissaConfig,
                description="the LiSSA fixed-point iteration on mean Hessian-vector products; scale > λ_max")
