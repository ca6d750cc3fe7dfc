r"""Generalised Gauss–Newton (GGN) curvature of any per-sample loss, and the ``curvature=`` choice of the solvers.

With ``z_i = f(θ, x_i)`` the model's outputs on sample i (flattened to C numbers), ``J_i = ∂z_i/∂θ`` (C, P) their
Jacobian with respect to the watched weights and ``H_i = ∂²l_i/∂z_i²`` (C, C) the Hessian of the sample's loss with
respect to the outputs, the Gauss–Newton matrix is

.. math::

    G = \frac{1}{N} \sum_i J_i^\top H_i J_i,

the Hessian of the mean loss without the terms ``Σ_c ∂l_i/∂z_ic · ∂²z_ic/∂θ²`` of the network's own second
derivatives. It is positive semi-definite whenever every ``H_i`` is, i.e. for losses convex in the outputs (squared
errors, cross-entropies on logits, with non-negative sample weights), whatever the network: then ``G + λI`` is
positive definite for every λ > 0, the exact solver factorises it by Cholesky and conjugate gradients converge where
the Hessian of a non-convex network stops them. For a softmax cross-entropy on logits ``H_i = diag(p_i) - p_i p_iᵀ``
and G is the true Fisher information (:class:`~deel.influenciae.common.fisher.FisherOperator` with ``kind="true"``).

Products ``G V`` never form a Jacobian: per chunk of samples, one forward pass, one backward pass ``u ↦ Jᵀ u`` kept on
a tape, and per column ``v`` of V the forward product ``J v`` (the derivative of ``Jᵀ u`` with respect to u in the
direction v: the double-VJP trick), ``H (J v)`` by automatic differentiation of the loss on the outputs only, and
the backward product ``Jᵀ H J v`` — about two passes through the network per column, against two to three for a
Hessian-vector product.
"""
import functools
import weakref
from typing import Any, Optional, Tuple, Union

import tensorflow as tf

from ..utils.batch_checks import compute_batches
from ..utils.progress import LOGGER
from ..utils.tf_operations import assert_batched_dataset, assert_known_cardinality, dataset_size
from .autodiff import LossKernels, chunked_mean, compile_function, map_columns
from .curvature import CurvatureOperator, memory_chunk
from .executor import Executor
from .memory import DEFAULT_MEMORY_BUDGET_BYTES, structure_bytes
from .model_wrappers import BaseInfluenceModel
from .pfor_converters import vectorized_per_sample

__all__ = ["CURVATURE_CHOICES", "GaussNewtonKernels", "GaussNewtonOperator", "check_curvature",
           "estimate_gauss_newton_bytes", "gauss_newton_kernels", "resolve_curvature"]

CURVATURE_CHOICES = ("hessian", "gauss_newton")
CurvatureSpec = Union[str, CurvatureOperator, None]

_ZERO = tf.UnconnectedGradients.ZERO

# Bytes of a dense accumulation step, in units of chunk × C × P elements of the model's dtype: the per-sample output
# Jacobians, the Jacobians weighted by the output Hessians, and the vectorized loop's temporaries.
_JACOBIAN_COPIES = 4


def check_curvature(curvature: CurvatureSpec) -> Union[str, CurvatureOperator]:
    """The ``curvature=`` argument of a solver, normalised: ``"hessian"`` (also for None), ``"gauss_newton"``, or
    the given :class:`CurvatureOperator`.

    Raises
    ------
    ValueError
        For a string other than the choices (case-insensitive) of ``CURVATURE_CHOICES``.
    TypeError
        For anything else than a string, None or a curvature operator.
    """
    if curvature is None:
        return "hessian"
    if isinstance(curvature, CurvatureOperator):
        return curvature
    if isinstance(curvature, str):
        if curvature.lower() in CURVATURE_CHOICES:
            return curvature.lower()
        raise ValueError(f"curvature must be one of {CURVATURE_CHOICES} or a CurvatureOperator, got {curvature!r}.")
    raise TypeError(f"curvature must be one of {CURVATURE_CHOICES} or a CurvatureOperator, got "
                    f"{type(curvature).__name__}.")


def resolve_curvature(curvature: CurvatureSpec, model: BaseInfluenceModel, train_dataset: Optional[tf.data.Dataset],
                      memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, chunk_size: Optional[int] = None,
                      verbose: Optional[bool] = None) -> Optional[CurvatureOperator]:
    """The curvature operator a solver uses for its ``curvature=`` argument.

    Parameters
    ----------
    curvature
        ``None`` or ``"hessian"``: the Hessian, which every solver builds its own way (returns None);
        ``"gauss_newton"``: a :class:`GaussNewtonOperator` over ``train_dataset``; a :class:`CurvatureOperator`:
        itself.
    model, train_dataset
        The influence model and the batched dataset of the mean curvature.
    memory_budget_bytes, chunk_size, verbose
        Of the Gauss–Newton operator.

    Returns
    -------
    CurvatureOperator or None
        None for the Hessian.

    Raises
    ------
    ValueError
        For an unknown name, or ``"gauss_newton"`` without ``train_dataset``.
    """
    curvature = check_curvature(curvature)
    if isinstance(curvature, CurvatureOperator):
        return curvature
    if curvature == "hessian":
        return None
    if train_dataset is None:
        raise ValueError("curvature='gauss_newton' needs a train_dataset (the samples of the mean curvature).")
    return GaussNewtonOperator(model, train_dataset, memory_budget_bytes=memory_budget_bytes, chunk_size=chunk_size,
                               verbose=verbose)


def _flat_outputs(outputs: Any) -> tf.Tensor:
    """The model's outputs (a tensor or a structure, batch first) as one (B, C) tensor."""
    parts = tf.nest.flatten(outputs)
    rows = tf.shape(parts[0])[0]
    flat = [tf.reshape(part, tf.stack([rows, -1])) for part in parts]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)


def _restore_outputs(flat: tf.Tensor, template: Any) -> Any:
    """The inverse of :func:`_flat_outputs`: (B, C) back into the structure and shapes of ``template``."""
    parts = tf.nest.flatten(template)
    if len(parts) == 1:
        return tf.nest.pack_sequence_as(template, [tf.reshape(flat, tf.shape(parts[0]))])
    sizes = tf.stack([tf.reduce_prod(tf.shape(part)[1:]) for part in parts])
    pieces = tf.split(flat, sizes, axis=1, num=len(parts))
    return tf.nest.pack_sequence_as(template, [tf.reshape(piece, tf.shape(part))
                                               for piece, part in zip(pieces, parts)])


class GaussNewtonKernels:
    """Compiled Gauss–Newton kernels of a model's :class:`~deel.influenciae.common.autodiff.LossKernels`: one
    instance (and one set of traces) per LossKernels, shared by every operator built on it
    (:func:`gauss_newton_kernels`).

    * ``summed_products(batch, vectors (P, K)) -> (P, K)``: ``Σ_i J_iᵀ H_i J_i V`` over the batch;
    * ``chunked_mean_products(samples, vectors, chunk_size) -> (P, K)``: the mean over samples held in memory,
      walked in chunks inside one compiled loop;
    * ``summed_matrix(batch) -> (P, P)``: ``Σ_i J_iᵀ H_i J_i`` from the per-sample output Jacobians (B, C, P);
    * ``output_size(batch) -> ()``: C, the number of outputs per sample.
    """

    def __init__(self, kernels: LossKernels):
        self.kernels = kernels
        self.dtype = kernels.dtype
        self.summed_products = compile_function(self.summed_products_eager)
        self.chunked_mean_products = compile_function(self.chunked_mean_products_eager)
        self.summed_matrix = compile_function(self.summed_matrix_eager)
        self.output_size = compile_function(self._output_size_eager)

    def _output_hessian_tapes(self, outputs: tf.Tensor, template: Any, targets: Any, sample_weight: Any
                              ) -> Tuple[tf.Tensor, tf.Tensor, tf.GradientTape]:
        """``(z, ∂Σl/∂z, tape)`` for fixed outputs z (B, C): the tape differentiates the gradient again, giving
        ``H_i u_i`` for every sample (the summed loss's Hessian in z is block diagonal: one (C, C) block each)."""
        fixed = tf.stop_gradient(outputs)
        with tf.GradientTape(persistent=True) as second:
            second.watch(fixed)
            with tf.GradientTape() as first:
                first.watch(fixed)
                losses = self.kernels.losses_of_outputs(targets, _restore_outputs(fixed, template), sample_weight)
                loss = tf.reduce_sum(losses)
            output_gradient = first.gradient(loss, fixed, unconnected_gradients=_ZERO)
        return fixed, output_gradient, second

    def summed_products_eager(self, batch: Tuple, vectors: tf.Tensor) -> tf.Tensor:
        """``Σ_i J_iᵀ H_i J_i V`` over the samples of ``batch``, for (P, K) vectors: (P, K)."""
        kernels = self.kernels
        inputs, targets, sample_weight = kernels.process_batch(batch)
        theta = kernels.flat_weights()
        vectors = tf.cast(vectors, theta.dtype)
        with tf.GradientTape(persistent=True) as network:
            network.watch(theta)
            template = kernels.outputs_of(kernels.unflatten(theta), inputs)
            outputs = _flat_outputs(template)
        # Jᵀ u is linear in u, so its derivative with respect to u in the direction v is J v (double-VJP trick). u is
        # ones, not zeros: TensorFlow may skip gradients flowing from a tensor it knows to be zero.
        cotangent = tf.ones_like(outputs)
        with tf.GradientTape(persistent=True) as linear:
            linear.watch(cotangent)
            transposed = network.gradient(outputs, theta, output_gradients=cotangent, unconnected_gradients=_ZERO)
        fixed, output_gradient, second = self._output_hessian_tapes(outputs, template, targets, sample_weight)

        def column(vector):
            forward = linear.gradient(transposed, cotangent, output_gradients=vector, unconnected_gradients=_ZERO)
            curved = second.gradient(output_gradient, fixed, output_gradients=tf.cast(forward, fixed.dtype),
                                     unconnected_gradients=_ZERO)
            return network.gradient(outputs, theta, output_gradients=tf.cast(curved, outputs.dtype),
                                    unconnected_gradients=_ZERO)

        # One column at a time (as the Hessian-vector products): the memory of one backward pass instead of K.
        return map_columns(column, vectors, theta)

    def chunked_mean_products_eager(self, samples: Tuple, vectors: tf.Tensor, chunk_size: tf.Tensor) -> tf.Tensor:
        """Mean over ``samples`` (N samples held in memory) of ``J_iᵀ H_i J_i V``, in chunks of ``chunk_size``
        inside one loop: (P, K)."""
        return chunked_mean(self.summed_products_eager, samples, tf.cast(vectors, self.dtype), chunk_size)

    def output_jacobians(self, theta: tf.Tensor, inputs: Any) -> tf.Tensor:
        """Per-sample Jacobians of the flattened outputs with respect to θ: (B, C, P), vectorized over the samples
        (a while loop only for the ops that cannot be vectorized, with a warning)."""
        kernels = self.kernels

        def one_sample(sample_inputs):
            sample_inputs = tf.nest.map_structure(lambda tensor: tf.expand_dims(tensor, 0), sample_inputs)
            with tf.GradientTape() as tape:
                tape.watch(theta)
                outputs = _flat_outputs(kernels.outputs_of(kernels.unflatten(theta), sample_inputs))[0]
            return tape.jacobian(outputs, theta, unconnected_gradients=_ZERO)

        return vectorized_per_sample(one_sample, inputs, "Per-sample output Jacobians")

    def summed_matrix_eager(self, batch: Tuple) -> tf.Tensor:
        """``Σ_i J_iᵀ H_i J_i`` over the samples of ``batch``: (P, P), from the (B, C, P) output Jacobians and the
        (B, C, C) output Hessians."""
        kernels = self.kernels
        inputs, targets, sample_weight = kernels.process_batch(batch)
        theta = kernels.flat_weights()
        jacobians = self.output_jacobians(theta, inputs)
        template = kernels.outputs_of(kernels.unflatten(theta), inputs)
        fixed, output_gradient, second = self._output_hessian_tapes(_flat_outputs(template), template, targets,
                                                                    sample_weight)
        hessians = tf.cast(second.batch_jacobian(output_gradient, fixed, unconnected_gradients=_ZERO), theta.dtype)
        weighted = tf.matmul(hessians, jacobians)  # (B, C, P): H_i J_i
        rows = tf.reshape(jacobians, [-1, self.kernels.nb_params])
        return tf.matmul(rows, tf.reshape(weighted, [-1, self.kernels.nb_params]), transpose_a=True)

    def _output_size_eager(self, batch: Tuple) -> tf.Tensor:
        inputs = self.kernels.process_batch(batch)[0]
        outputs = self.kernels.outputs_of(self.kernels.unflatten(self.kernels.flat_weights()), inputs)
        return tf.shape(_flat_outputs(outputs))[1]


_KERNELS: "weakref.WeakKeyDictionary[LossKernels, GaussNewtonKernels]" = weakref.WeakKeyDictionary()


def gauss_newton_kernels(kernels: LossKernels) -> GaussNewtonKernels:
    """The Gauss–Newton kernels of a model's loss kernels, built once (their traces are shared by every operator)."""
    if kernels not in _KERNELS:
        _KERNELS[kernels] = GaussNewtonKernels(kernels)
    return _KERNELS[kernels]


def estimate_gauss_newton_bytes(nb_params: int, nb_outputs: int, chunk_size: int,
                                dtype: tf.DType = tf.float32) -> int:
    """Peak bytes of :meth:`GaussNewtonOperator.dense_sum`: the float64 (P, P) sum, the cast chunk matrix and the new
    sum (3 × 8 P²), the chunk's matrix in ``dtype`` (s P²) and ``_JACOBIAN_COPIES`` × chunk × C × P elements of the
    output Jacobians and their temporaries."""
    size = tf.as_dtype(dtype).size
    return int(nb_params) ** 2 * (24 + size) + _JACOBIAN_COPIES * int(chunk_size) * int(nb_outputs) * int(
        nb_params) * size


class GaussNewtonOperator(CurvatureOperator):
    r"""The mean generalised Gauss–Newton matrix ``G = 1/N Σ_i J_iᵀ H_i J_i`` of any per-sample loss over
    ``train_set`` (see the module docstring): J_i (C, P) the Jacobian of sample i's flattened model outputs with
    respect to the watched weights, H_i (C, C) the Hessian of its loss with respect to those outputs (sample weights
    included). Positive semi-definite for losses convex in the outputs; the true Fisher for a softmax cross-entropy
    on logits.

    Parameters
    ----------
    model
        Influence model: its watched weights, its model's outputs and its per-sample loss ``loss(y, outputs[, w])``.
    train_set
        Batched, finite dataset of the mean.
    memory_budget_bytes
        When the samples fit it they are gathered in memory once and every product walks them in chunks inside one
        compiled loop; otherwise every product streams the dataset, one batch at a time. :meth:`dense_sum` refuses
        (``ValueError``) when its estimate (:func:`estimate_gauss_newton_bytes`) exceeds it, and takes as many
        samples per step as it allows.
    chunk_size
        Samples per chunk of the in-memory products (default: as :class:`ForwardOverBackwardHVP`).
    verbose
        Progress bar over the dense accumulation (None: interactive sessions only).

    Attributes
    ----------
    nb_samples : int
        N.
    in_memory : bool
        Whether the products hold the samples in memory (gathered on the first product) or stream them.
    memory_estimate_bytes : int or None
        The estimate checked by the last :meth:`dense_sum`.
    """

    def __init__(self, model: BaseInfluenceModel, train_set: tf.data.Dataset,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, chunk_size: Optional[int] = None,
                 verbose: Optional[bool] = None):
        super().__init__(model)
        assert_batched_dataset(train_set, "train_set")
        assert_known_cardinality(train_set, "train_set")
        self.train_set = train_set
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.verbose = verbose
        self.kernels = gauss_newton_kernels(model.kernels)
        self._executor = Executor(verbose=verbose, memory_budget_bytes=memory_budget_bytes, strategy=model.strategy)
        first = next(iter(compute_batches(train_set.take(1))), None)
        if first is None:
            raise ValueError("train_set is empty.")
        self._first_batch = tuple(first) if isinstance(first, (tuple, list)) else (first,)
        self._first_size = int(tf.shape(tf.nest.flatten(first)[0])[0])
        self.nb_samples = dataset_size(train_set)
        self.in_memory = structure_bytes(first) / self._first_size * self.nb_samples <= memory_budget_bytes
        if not self.in_memory:
            LOGGER.info("Gauss–Newton products stream their %d samples (above memory_budget_bytes=%d).",
                        self.nb_samples, memory_budget_bytes)
        self.chunk_size = int(chunk_size) if chunk_size else max(self._first_size,
                                                                 memory_chunk(train_set, self.nb_samples))
        self.memory_estimate_bytes: Optional[int] = None
        self._samples = None

    @property
    def samples(self) -> Optional[Tuple]:
        """The samples held in memory for the products, gathered on first use (None when they are streamed)."""
        if self.in_memory and self._samples is None:
            # Eagerly, also when the first product is traced (e.g. by column-wise CG).
            with tf.init_scope():  # pylint: disable=not-context-manager
                self._samples = self._executor.gather(self.train_set, name="train_set")
        return self._samples

    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        """``G V`` (mean Gauss–Newton matrix): (P,), (P, 1) or (P, K) -> (P, 1) or (P, K)."""
        vectors = tf.cast(tf.convert_to_tensor(vectors), self.dtype)
        if vectors.shape.rank == 1:
            vectors = vectors[:, None]
        if self.samples is not None:
            return self.kernels.chunked_mean_products(self.samples, vectors, tf.constant(self.chunk_size))
        total, count = self._executor.sum(lambda batch: self.kernels.summed_products(batch, vectors), self.train_set,
                                          name="train_set")
        return total / tf.cast(count, self.dtype)

    def dense_sum(self) -> Tuple[tf.Tensor, int]:
        """``(Σ_i J_iᵀ H_i J_i (P, P) float64, N)``: per step, the per-sample output Jacobians (chunk, C, P) of as
        many samples as ``memory_budget_bytes`` allows (at most a batch) contracted with the output Hessians.

        Raises
        ------
        ValueError
            If even one sample per step exceeds ``memory_budget_bytes``.
        """
        nb_params = self.nb_params
        nb_outputs = int(self.kernels.output_size(self._first_batch))
        per_sample = estimate_gauss_newton_bytes(nb_params, nb_outputs, 1, self.dtype) - \
            estimate_gauss_newton_bytes(nb_params, nb_outputs, 0, self.dtype)
        fixed = estimate_gauss_newton_bytes(nb_params, nb_outputs, 0, self.dtype)
        chunk = int(min(self._first_size, max(1, (self.memory_budget_bytes - fixed) // max(1, per_sample))))
        self.memory_estimate_bytes = estimate_gauss_newton_bytes(nb_params, nb_outputs, chunk, self.dtype)
        if self.memory_estimate_bytes > self.memory_budget_bytes:
            raise ValueError(
                f"The dense Gauss–Newton matrix would need about {self.memory_estimate_bytes / 1024 ** 3:.2f} GiB "
                f"(P={nb_params}, C={nb_outputs} outputs per sample), above memory_budget_bytes="
                f"{self.memory_budget_bytes}. Use its products (ConjugateGradientDescentIHVP, LissaIHVP or ArnoldiIHVP "
                "with curvature='gauss_newton'), watch fewer weights, or raise memory_budget_bytes.")
        summed = functools.partial(self._summed_matrix, chunk=chunk)
        total, count = self._executor.sum(summed, self.train_set, "Gauss–Newton", name="train_set",
                                          accumulate=tf.float64)
        return tf.cast(total, tf.float64), count

    def _summed_matrix(self, batch: Tuple, chunk: int) -> tf.Tensor:
        """``Σ_i J_iᵀ H_i J_i`` over one batch, in steps of ``chunk`` samples, summed in float64."""
        batch = self.model.check_batch(batch)
        size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
        if size <= chunk:
            return tf.cast(self.kernels.summed_matrix(batch), tf.float64)
        total = None
        for start in range(0, size, chunk):
            part = tf.nest.map_structure(lambda tensor, begin=start: tensor[begin:begin + chunk], batch)
            matrix = tf.cast(self.kernels.summed_matrix(part), tf.float64)
            total = matrix if total is None else total + matrix
        return total
