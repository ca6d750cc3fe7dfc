"""K-FAC and EK-FAC inverse-curvature products: a block-diagonal, Kronecker-factored Fisher, never a P × P matrix.

Per Kronecker block (:mod:`.kronecker_blocks`: a Dense, EinsumDense, Conv2D or Embedding kernel with its bias),
with ``A = Q_A diag(α) Q_Aᵀ`` and ``S = Q_S diag(σ) Q_Sᵀ`` the eigendecompositions of its factors, the inverse
product of the block's part V (rows, out) of a vector is

    ``(F_block + λ I)⁻¹ V = Q_A [(Q_Aᵀ V Q_S) / (Λ + λ)] Q_Sᵀ``   (elementwise division),

with ``Λ = α σᵀ`` for K-FAC and the corrected eigenvalues ``Λ = 1/N Σ_i (Q_Aᵀ G_i Q_S)²`` for EK-FAC. Blocks of
different layers do not interact (block-diagonal curvature). The fit has three stages, each a pass over the data
or a factorisation, each saved when ``cache_dir`` is given (a rerun resumes after the last completed stage):

1. ``covariances``: ``Σ a aᵀ`` and ``Σ δ δᵀ`` per block (one forward and backward pass per batch);
2. ``eigendecompositions``: of ``A`` and ``S`` (float64, no data);
3. ``corrected_eigenvalues`` (EK-FAC only): one more pass over the data.
"""
import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from ..utils.progress import LOGGER
from .distribution import batch_position
from .executor import Executor
from .factor_kernels import compiled_for_batches
from .fisher import FISHER_KINDS, _loss_from_logits  # pylint: disable=protected-access
from .ihvp_base import InverseHessianVectorProduct, check_regularization, default_rcond
from .kronecker_blocks import (BlockStructure, KroneckerBlock, activation_sum, block_matrices, find_blocks,
                               gradient_sum, scatter_matrices, split_vectors, squared_rotated_sum,
                               weighted_rotated_norms)
from .kfac_storage import (STAGES, ForeignStageError, fingerprint, read_manifest, read_stage, write_manifest,
                           write_stage)
from .memory import DEFAULT_MEMORY_BUDGET_BYTES
from .model_wrappers import BaseInfluenceModel
from .solver_registry import SolverConfig, register_solver



def _shared_pass(model: BaseInfluenceModel, key: Tuple, function: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled ``function`` of ``model`` for ``key`` (compiled the first time), kept with the model's factor
    kernels and shared by every solver of the model: refitting with another λ, Fisher seed or scaling, or a second
    solver on the same model, does not trace the passes again. ``key`` holds what the traced graph depends on; the
    bases and inverse eigenvalues are arguments, not captured constants."""
    passes = model.layer_factors.shared_functions
    if ("kfac",) + key not in passes:
        passes[("kfac",) + key] = compiled_for_batches(function)
    return passes[("kfac",) + key]


def _labelled(model: BaseInfluenceModel, fisher: Tuple[str, int, Optional[bool]], batch: Tuple,
              position: tf.Tensor, stage: int) -> Tuple:
    """The batch with the true Fisher's labels drawn from the model (``fisher = (kind, seed, from_logits)``); the
    batch itself for the empirical Fisher.

    The draw of a sample depends only on the seed, the stage and where the sample lies in the dataset (``position``
    = (batch index, first row of the slice), int64): Gumbel-max over noise generated for the batch's rows up to the
    slice's end, so a batch split across replicas draws the same labels as on one device."""
    kind, seed, from_logits = fisher
    if kind == "empirical":
        return batch
    inputs, labels = batch[0], batch[1]
    outputs = tf.cast(model(inputs), tf.float32)
    logits = outputs if from_logits else tf.math.log(tf.maximum(outputs, 1e-30))
    seeds = tf.stack([tf.constant(seed, tf.int64) * 7919 + stage, tf.cast(position[0], tf.int64)])
    offset = tf.cast(position[1], tf.int32)
    rows = tf.shape(logits)[0]
    uniform = tf.random.stateless_uniform(tf.stack([offset + rows, tf.shape(logits)[1]]), seeds, minval=1e-20,
                                          maxval=1.0)[offset:]
    drawn = tf.argmax(logits - tf.math.log(-tf.math.log(uniform)), axis=-1)
    if labels.shape.rank == 1 or int(labels.shape[-1]) == 1:
        labels = tf.reshape(tf.cast(drawn, labels.dtype), tf.shape(labels))
    else:
        labels = tf.one_hot(drawn, int(labels.shape[-1]), dtype=labels.dtype)
    return (inputs, labels, *batch[2:])


class KFACMemoryEstimate(NamedTuple):
    """What a K-FAC / EK-FAC fit holds, in bytes.

    Attributes
    ----------
    factors
        The factors kept after the fit (float64): ``A``, ``S``, their eigenvectors, the eigenvalues (and, for
        EK-FAC, the corrected (rows, out) eigenvalues), summed over blocks.
    batch
        The per-batch tensors of a pass: rows and output gradients of every block (and, for EK-FAC, the rotated
        per-sample gradients of the largest block).
    """

    factors: int
    batch: int

    @property
    def total(self) -> int:
        """``factors + batch``."""
        return self.factors + self.batch


class KFACIHVP(InverseHessianVectorProduct):  # pylint: disable=too-many-instance-attributes
    """Inverse products with the block-diagonal K-FAC approximation of the mean Fisher (see the module docstring).

    Parameters
    ----------
    model
        The influence model; its watched weights must be kernels (and biases) of Dense, EinsumDense, Conv2D or
        Embedding layers (see ``unsupported_layers``).
    train_dataset
        Batched, finite dataset of ``(inputs, labels)``; the Fisher is the mean over its samples.
    regularization
        λ ≥ 0, absolute, added to every eigenvalue (the same scale as the other solvers': the mean per-sample loss).
    fisher
        ``"empirical"`` (default: the data's labels; one pass, and on the digits benchmark at least as good as the
        true Fisher, see docs/methods/kfac.md) or ``"true"`` (labels drawn from the model's predictive distribution,
        seeded by ``seed``; classifiers trained with a cross-entropy).
    seed
        Seed of the true Fisher's labels.
    damping_heuristic
        When given (e.g. 0.1, the rule kronfluence applies when its ``damping_factor`` is None), each block is
        damped by ``regularization + damping_heuristic · mean(Λ_block)`` instead of ``regularization`` alone.
    unsupported_layers
        ``"raise"`` (default): a watched weight outside every block is a ``ValueError`` naming its layer;
        ``"skip"``: it is left out (its part of every product is 0).
    from_logits
        For ``fisher="true"``: whether the model outputs logits; None reads it from the Keras loss.
    cache_dir
        Directory where each completed fit stage is saved and from which a rerun (or :meth:`load`) resumes.
    memory_budget_bytes
        The fit refuses to start when :meth:`memory_estimate` exceeds it.
    verbose
        Progress bars of the passes (None: interactive sessions only).
    statistics_dtype
        dtype of the per-batch statistics (default: the model's); sums over batches are float64.
    solve_dtype
        dtype of the inverse products and quadratic forms (rotations into the Kronecker eigenbases). None (default):
        the model's, float32 for a float32 model (about 4 times faster than float64 on CPUs; on the digits MLP and
        CNN of the benchmarks, self-influence within 3e-6 and pairwise scores within 3e-5 relative of float64
        products, even at λ = 1e-8), float64 for a float64 model; or ``"float32"`` / ``"float64"``.
    position_scaling
        For layers applied at T > 1 positions per sample (convolutions, sequences): ``"sum"`` (default, Grosse &
        Martens 2016) takes ``S = 1/N Σ_{i,p} δ δᵀ`` so that ``A ⊗ S`` approximates the Fisher of gradients summed
        over positions; ``"mean"`` divides S by T as well (kronfluence's convention; the block is T times smaller).
        Layers with one position are not affected, nor are EK-FAC's eigenvalues (refitted from the gradients).
    fit_now
        Fit in the constructor.

    Attributes
    ----------
    structure : BlockStructure
        The blocks and the weights left out (after the fit starts).
    """

    corrected = False
    kind = "kfac"

    def __init__(self, model: BaseInfluenceModel, train_dataset: tf.data.Dataset, regularization: float = 0.0,
                 fisher: str = "empirical", seed: int = 0, damping_heuristic: Optional[float] = None,
                 unsupported_layers: str = "raise", from_logits: Optional[bool] = None,
                 cache_dir: Optional[Union[str, Path]] = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, verbose: Optional[bool] = None,
                 statistics_dtype: Optional[tf.DType] = None, position_scaling: str = "sum",
                 solve_dtype: Optional[Union[str, tf.DType]] = None, fit_now: bool = True):
        if train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a train_dataset (the Fisher is a mean over it).")
        super().__init__(model, train_dataset)
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}.")
        if fisher == "true":
            from_logits = _loss_from_logits(model.loss_function) if from_logits is None else bool(from_logits)
            if from_logits is None:
                raise ValueError("fisher='true' needs the predicted probabilities: pass from_logits=True (the model "
                                 "outputs logits) or False (probabilities); the loss does not say.")
        if position_scaling not in ("sum", "mean"):
            raise ValueError(f"position_scaling must be 'sum' or 'mean', got {position_scaling!r}.")
        self.position_scaling = position_scaling
        if damping_heuristic is not None:
            damping_heuristic = check_regularization(damping_heuristic)
        self.regularization = check_regularization(regularization)
        self.fisher = fisher
        self.seed = int(seed)
        self.damping_heuristic = damping_heuristic
        self.unsupported_layers = unsupported_layers
        self.from_logits = from_logits
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.statistics_dtype = tf.as_dtype(statistics_dtype or model.dtype)
        self.solve_dtype = tf.as_dtype(solve_dtype or (tf.float64 if model.dtype == tf.float64 else tf.float32))
        if self.solve_dtype not in (tf.float32, tf.float64):
            raise ValueError(f"solve_dtype must be float32 or float64, got {self.solve_dtype.name}.")
        self.executor = Executor(verbose=verbose, memory_budget_bytes=memory_budget_bytes, strategy=model.strategy)
        self.structure: Optional[BlockStructure] = None
        self.state: Dict[str, Dict[str, np.ndarray]] = {}
        self._compiled: Dict[str, Any] = {}
        self._bases: List[Tuple[Optional[tf.Tensor], tf.Tensor]] = []
        self._values: List[tf.Tensor] = []
        self._inverse_values: List[tf.Tensor] = []
        if fit_now:
            self.fit()

    # Structure and memory -------------------------------------------------------------------------------------------
    def _first_batch(self) -> Tuple:
        return next(self.executor.batches(self.train_set.take(1), name="train_dataset"))

    def _ensure_structure(self) -> BlockStructure:
        if self.structure is None:
            self.structure = find_blocks(self.model, self._first_batch(), self.unsupported_layers)
            if self.structure.skipped:
                LOGGER.warning("%s leaves these weights out of the curvature: %s", type(self).__name__,
                               " ".join(self.structure.reasons))
        return self.structure

    @property
    def blocks(self) -> Tuple[KroneckerBlock, ...]:
        """The Kronecker blocks (the structure is read from a first batch when needed)."""
        return self._ensure_structure().blocks

    def memory_estimate(self) -> KFACMemoryEstimate:
        """Bytes the fit will hold (factors kept, per-batch tensors), from the shapes of a first batch; nothing is
        computed over the data."""
        batch = self._first_batch()
        factors = self.model.layer_factors(batch)
        batch_size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
        held, per_batch, largest = 0, 0, 0
        for block in self.blocks:
            layer = factors.layers[block.factor_index]
            positions = int(layer.positions or 1)
            rows = block.rows if not block.diagonal_rows else 1
            held += 8 * (2 * block.out_size ** 2 + block.out_size)
            held += 8 * (block.rows if block.diagonal_rows else 2 * block.rows ** 2 + block.rows)
            held += 8 * block.nb_params if self.corrected else 0
            per_batch += self.statistics_dtype.size * batch_size * positions * (rows + block.out_size)
            largest = max(largest, self.statistics_dtype.size * batch_size * block.nb_params)
        return KFACMemoryEstimate(held, per_batch + (largest if self.corrected else 0))

    # Stage files --------------------------------------------------------------------------------------------------
    def _fingerprint(self, stage: str) -> str:
        """What a stage's values depend on: weights, blocks, Fisher kind (and seed), the data's size and shapes."""
        return fingerprint({"fisher": self.fisher, "unsupported": self.unsupported_layers,
                            "scaling": self.position_scaling if stage != "covariances" else None,
                            "seed": self.seed if self.fisher == "true" else None, "samples": int(self.cardinality),
                            "blocks": [(b.name, b.rows, b.out_size, b.homogeneous) for b in self.blocks],
                            "spec": str(self.train_set.element_spec), "stage": stage}, self.model.kernels.watched)

    def _read_stage(self, directory: Path, stage: str, strict: bool) -> bool:
        """Load a stage saved in ``directory``; False when it is missing (or, unless ``strict``, foreign)."""
        try:
            state = read_stage(directory, stage, self._fingerprint(stage))
        except ForeignStageError:
            if strict:
                raise
            LOGGER.warning("Ignoring the %s in %s: fitted for other weights or settings; refitting.", stage, directory)
            return False
        for index, fields in (state or {}).items():
            self.state.setdefault(index, {}).update(fields)
        return state is not None

    # Fit ----------------------------------------------------------------------------------------------------------
    @property
    def _stages(self) -> Tuple[str, ...]:
        return STAGES if self.corrected else STAGES[:2]

    def _fit(self) -> None:
        blocks = self._ensure_structure().blocks
        estimate = self.memory_estimate()
        LOGGER.info("%s fit: about %.1f MiB of factors and %.1f MiB per batch.", type(self).__name__,
                    estimate.factors / 2 ** 20, estimate.batch / 2 ** 20)
        if estimate.total > self.executor.memory_budget_bytes:
            raise ValueError(f"{type(self).__name__} would hold about {estimate.total / 2 ** 30:.2f} GiB "
                             f"(factors {estimate.factors / 2 ** 30:.2f} GiB, per batch {estimate.batch / 2 ** 30:.2f} "
                             f"GiB), over memory_budget_bytes={self.executor.memory_budget_bytes}; use smaller "
                             "batches or raise the budget.")
        runners = {"covariances": self._fit_covariances, "eigendecompositions": self._fit_eigendecompositions,
                   "corrected_eigenvalues": self._fit_corrected_eigenvalues}
        for stage in self._stages:
            if self.cache_dir is not None and self._read_stage(self.cache_dir, stage, strict=False):
                LOGGER.info("%s: %s loaded from %s.", type(self).__name__, stage, self.cache_dir)
                continue
            runners[stage](blocks)
            if self.cache_dir is not None:
                write_stage(self.cache_dir, stage, self.state, self._fingerprint(stage))
        self._prepare()

    @property
    def _fisher_key(self) -> Tuple[str, int, Optional[bool]]:
        """What the drawn labels depend on: (kind, seed, from_logits); the seed only for the true Fisher."""
        return (self.fisher, self.seed if self.fisher == "true" else 0, self.from_logits)

    def _stream(self, name: str, statistics: Callable[..., Any], description: str,
                arguments: Tuple = ()) -> Tuple[Any, int]:
        """Σ over the batches of a compiled ``statistics(batch, position, *arguments)`` (shared by the solvers of the
        model, see ``_SHARED_PASSES``; ``position`` = (batch index, first row) of the rows computed), in float64,
        and N."""
        key = (name, self._fisher_key, self.statistics_dtype.name, self.blocks)
        compiled = self._compiled[name] = _shared_pass(self.model, key, statistics)

        def summed(batch: Tuple) -> Any:
            return compiled(batch, tf.constant(tuple(batch_position()), tf.int64), *arguments)

        return self.executor.sum(summed,
                                 self.train_set, description, name="train_dataset", accumulate=tf.float64)

    def _fit_covariances(self, blocks: Tuple[KroneckerBlock, ...]) -> None:
        model, dtype, fisher = self.model, self.statistics_dtype, self._fisher_key

        def statistics(batch: Tuple, position: tf.Tensor) -> Tuple:
            factors = model.layer_factors.in_graph(_labelled(model, fisher, batch, position, 0))
            sums = []
            for block in blocks:
                layer = factors.layers[block.factor_index]
                positions = tf.cast(tf.size(layer.output_gradients) // block.out_size, tf.float64)
                sums.append((activation_sum(block, layer, dtype), gradient_sum(layer.output_gradients, dtype),
                             positions))
            return tuple(sums)

        totals, count = self._stream("covariances", statistics, f"{type(self).__name__} covariances")
        for index, (activations, gradients, positions) in enumerate(totals):
            self.state[str(index)] = {"activation_sum": np.asarray(activations, np.float64),
                                      "gradient_sum": np.asarray(gradients, np.float64),
                                      "rows_count": np.array(float(positions)), "samples": np.array(float(count))}

    def _fit_eigendecompositions(self, blocks: Tuple[KroneckerBlock, ...]) -> None:
        for index, block in enumerate(blocks):
            fields = self.state[str(index)]
            activations = fields["activation_sum"] / float(fields["rows_count"])
            gradients = fields["gradient_sum"] / float(fields["samples"])
            if self.position_scaling == "mean":
                gradients = gradients * float(fields["samples"]) / float(fields["rows_count"])
            if block.diagonal_rows:
                fields["rows_values"] = activations
            else:
                fields["rows_values"], fields["rows_basis"] = np.linalg.eigh((activations + activations.T) / 2)
            fields["outputs_values"], fields["outputs_basis"] = np.linalg.eigh((gradients + gradients.T) / 2)

    def _fit_corrected_eigenvalues(self, blocks: Tuple[KroneckerBlock, ...]) -> None:
        model, fisher = self.model, self._fisher_key
        bases = self.block_bases(self.statistics_dtype)

        def statistics(batch: Tuple, position: tf.Tensor, block_bases: Tuple) -> Tuple:
            factors = model.layer_factors.in_graph(_labelled(model, fisher, batch, position, 1))
            return tuple(squared_rotated_sum(block, factors.layers[block.factor_index], *basis)
                         for block, basis in zip(blocks, block_bases))

        totals, count = self._stream("corrected", statistics, f"{type(self).__name__} corrected eigenvalues",
                                     (bases,))
        for index, total in enumerate(totals):
            self.state[str(index)]["corrected"] = np.asarray(total, np.float64) / float(count)

    # Products -----------------------------------------------------------------------------------------------------
    def eigenvalues(self, index: int) -> np.ndarray:
        """Λ of block ``index`` (undamped): (rows, out)."""
        fields = self.state[str(index)]
        if self.corrected:
            return fields["corrected"]
        return np.maximum(np.outer(fields["rows_values"], fields["outputs_values"]), 0.0)

    def block_damping(self, index: int) -> float:
        """λ of block ``index``: ``regularization`` (+ ``damping_heuristic · mean(Λ)``)."""
        if self.damping_heuristic is None:
            return self.regularization
        return self.regularization + self.damping_heuristic * float(self.eigenvalues(index).mean())

    def block_bases(self, dtype: tf.DType) -> Tuple[Tuple[Optional[tf.Tensor], tf.Tensor], ...]:
        """``(Q_A, Q_S)`` of every block in ``dtype`` (Q_A None for an embedding's diagonal A), once the
        eigendecompositions are fitted."""
        return tuple((None if block.diagonal_rows else tf.constant(self.state[str(index)]["rows_basis"], dtype),
                      tf.constant(self.state[str(index)]["outputs_basis"], dtype))
                     for index, block in enumerate(self.blocks))

    def _prepare(self) -> None:
        """Tensors of the products: bases and ``1 / (Λ + λ)`` per block (rebuilt when λ changes)."""
        dtype = self.solve_dtype
        self._bases = list(self.block_bases(dtype))
        self._values = [tf.constant(self.eigenvalues(index), dtype) for index in range(len(self.blocks))]
        inverse = []
        for index, values in enumerate(self._values):
            damped = values.numpy() + self.block_damping(index)
            # λ = 0 on a singular block: a pseudo-inverse (directions below the ExactIHVP cut-off are dropped).
            cutoff = default_rcond(damped.size, tf.float64) * max(float(np.abs(damped).max()), 0.0)
            kept = damped > cutoff
            inverse.append(tf.constant(np.where(kept, 1.0 / np.where(kept, damped, 1.0), 0.0), dtype))
        self._inverse_values = inverse
        for name in ("quadratic",):
            self._compiled.pop(name, None)

    def _redamp(self) -> None:
        self._compiled = dict(self._compiled)
        if self.is_fitted:
            self._prepare()

    def _rotate(self, index: int, matrices: tf.Tensor, back: bool) -> tf.Tensor:
        """``Q_Aᵀ M Q_S`` (or ``Q_A M Q_Sᵀ`` with ``back``) for (K, rows, out) matrices."""
        rows_basis, outputs_basis = self._bases[index]
        if rows_basis is not None:
            matrices = tf.einsum("ji,kjo->kio" if not back else "ij,kjo->kio", rows_basis, matrices)
        return tf.matmul(matrices, outputs_basis, transpose_b=back)

    def _blockwise(self, vectors: tf.Tensor, scaling: List[tf.Tensor]) -> tf.Tensor:
        """``Q_A [(Q_Aᵀ V Q_S) ⊙ scaling] Q_Sᵀ`` per block, 0 on the skipped weights: (P, K) -> (P, K), in
        ``solve_dtype``."""
        rows = tf.transpose(tf.cast(vectors, self.solve_dtype))
        parts = split_vectors(rows, self.model.kernels.sizes)
        result: List[Optional[tf.Tensor]] = [tf.zeros_like(part) for part in parts]
        for index, block in enumerate(self.blocks):
            rotated = self._rotate(index, block_matrices(block, parts), back=False) * scaling[index]
            scatter_matrices(block, self._rotate(index, rotated, back=True), result)
        return tf.transpose(tf.concat(result, axis=1))

    def apply_inverse(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(F + λI)⁻¹ V`` block by block: (P, K) -> (P, K), in the model's dtype (computed in ``solve_dtype``).
        Run eagerly: a few large products per block, called once per batch of test vectors, cost less than a trace."""
        return tf.cast(self._blockwise(vectors, self._inverse_values), self.model.dtype)

    def apply_hessian(self, vectors: tf.Tensor) -> tf.Tensor:
        """``F V`` with the block-diagonal Kronecker-factored F (undamped): (P, K) -> (P, K)."""
        self.fit()
        return tf.cast(self._blockwise(vectors, self._values), self.model.dtype)

    def inverse_quadratic_form(self, vectors: tf.Tensor) -> tf.Tensor:
        """``vᵀ (F + λI)⁻¹ v`` per column, from the rotated blocks (no rotation back): (P, K) -> (K,), in the model's
        dtype."""
        if "quadratic" not in self._compiled:
            def quadratic(values: tf.Tensor) -> tf.Tensor:
                parts = split_vectors(tf.transpose(tf.cast(values, self.solve_dtype)), self.model.kernels.sizes)
                terms = [tf.reduce_sum(tf.square(self._rotate(index, block_matrices(block, parts), back=False))
                                       * self._inverse_values[index], axis=[1, 2])
                         for index, block in enumerate(self.blocks)]
                return tf.add_n(terms)
            self._compiled["quadratic"] = tf.function(quadratic)
        return tf.cast(self._compiled["quadratic"](vectors), self.model.dtype)

    def batch_quadratic_form(self, batch: Tuple) -> tf.Tensor:
        """``g(z)ᵀ (F + λI)⁻¹ g(z)`` for every sample z of a batch, from the layers' inputs and output gradients
        (each block's rotated gradient ``Q_Aᵀ G_z Q_S`` without the flat (B, P) gradients): (B,), in the model's
        dtype (computed in ``solve_dtype``)."""
        self.fit()
        model, blocks = self.model, self.blocks

        def quadratic(samples: Tuple, bases: Tuple, inverse_values: Tuple) -> tf.Tensor:
            factors = model.layer_factors.in_graph(samples)
            return tf.add_n([weighted_rotated_norms(block, factors.layers[block.factor_index], *basis, weights)
                             for block, basis, weights in zip(blocks, bases, inverse_values)])

        compiled = self._compiled["batch_quadratic"] = _shared_pass(
            model, ("batch_quadratic", self.solve_dtype.name, blocks), quadratic)
        return tf.cast(compiled(tuple(batch), tuple(self._bases), tuple(self._inverse_values)), self.model.dtype)

    # Saving and loading ---------------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the fitted stages to the directory ``path`` (one ``<stage>.npz`` each, with a fingerprint of the
        weights and settings) and return it; :meth:`load` (or ``cache_dir=path``) reads them back."""
        self.fit()
        directory = Path(path)
        for stage in self._stages:
            write_stage(directory, stage, self.state, self._fingerprint(stage))
        write_manifest(directory, {"solver": self.kind, "fisher": self.fisher, "seed": self.seed,
                                   "unsupported_layers": self.unsupported_layers,
                                   "position_scaling": self.position_scaling,
                                   "blocks": [block.description() for block in self.blocks]})
        return directory

    @classmethod
    def load(cls, path: Union[str, Path], model: BaseInfluenceModel, train_dataset: tf.data.Dataset,
             **settings: Any) -> "KFACIHVP":
        """A fitted solver from a directory written by :meth:`save`; nothing is recomputed over the data (one
        batch of ``train_dataset`` is read to rebuild the layer plan).

        Raises
        ------
        ValueError
            If the directory misses a stage, was saved by another solver or Fisher kind, or for other weights.
        """
        directory = Path(path)
        manifest = read_manifest(directory)
        if manifest.get("solver") not in ("kfac", "ekfac") or (cls.corrected and manifest["solver"] != "ekfac"):
            raise ValueError(f"{str(directory)!r} holds {manifest.get('solver')!r} factors, not {cls.kind!r} ones.")
        settings.setdefault("fisher", manifest["fisher"])
        settings.setdefault("seed", manifest["seed"])
        settings.setdefault("unsupported_layers", manifest["unsupported_layers"])
        settings.setdefault("position_scaling", manifest.get("position_scaling", "sum"))
        solver = cls(model, train_dataset, fit_now=False, **settings)
        for stage in solver._stages:  # pylint: disable=protected-access
            if not solver._read_stage(directory, stage, strict=True):  # pylint: disable=protected-access
                raise ValueError(f"{str(directory)!r} misses the {stage} stage.")
        solver._prepare()  # pylint: disable=protected-access
        solver._fitted = True  # pylint: disable=protected-access
        return solver


class EKFACIHVP(KFACIHVP):
    """Inverse products with EK-FAC: K-FAC's Kronecker eigenbases with eigenvalues refitted to the data, the
    mean of ``(Q_Aᵀ G_i Q_S)²`` (one more pass over the data). Same parameters as :class:`KFACIHVP`."""

    corrected = True
    kind = "ekfac"


@dataclasses.dataclass(frozen=True)
class KFACConfig(SolverConfig):
    """Settings of :class:`KFACIHVP` (see its parameters)."""

    fisher: str = "empirical"
    seed: int = 0
    damping_heuristic: Optional[float] = None
    unsupported_layers: str = "raise"
    from_logits: Optional[bool] = None
    cache_dir: Optional[str] = None
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    verbose: Optional[bool] = None
    position_scaling: str = "sum"
    solve_dtype: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class EKFACConfig(KFACConfig):
    """Settings of :class:`EKFACIHVP` (see :class:`KFACIHVP`'s parameters)."""


register_solver("kfac", KFACIHVP, KFACConfig, aliases=("k-fac",),
                description="Block-diagonal Kronecker-factored Fisher (K-FAC): Dense, EinsumDense, Conv2D, Embedding")
register_solver("ekfac", EKFACIHVP, EKFACConfig, aliases=("ek-fac",),
                description="K-FAC with eigenvalues refitted in the Kronecker eigenbasis (EK-FAC)")
