"""Seeded random projections of per-sample gradients (TRAK, projected TracIn, the on-disk index).

A projection maps a per-sample gradient ``g`` (P values) to ``φ = Rᵀ g / √d`` (d values) with a random P × d matrix
R of independent entries of mean 0 and variance 1 (signs ±1, "rademacher", or standard normal, "gaussian"), so that
inner products are preserved in expectation: ``E[φ(g) · φ(h)] = g · h`` (Johnson–Lindenstrauss).

R is never held: it is generated block by block from the seed (counter-based stateless generators, the same values
on every run), ``BLOCK_ROWS`` rows of P at a time, each block multiplied into the result and dropped.

With ``factored=True`` the kernel of each Dense, EinsumDense, Conv2D and Embedding layer gets a Kronecker-factored
projection ``R_in ⊗ R_out`` (Choe et al. 2024, LoGra): the per-sample gradient of the kernel, ``G_i = Σ_p a_p δ_pᵀ``
(in × out, from the layer inputs a and output gradients δ at the positions p of sample i), is projected as

    ``φ_i = vec(R_inᵀ G_i R_out) / √(d_in d_out) = vec(Σ_p (R_inᵀ a_p)(R_outᵀ δ_p)ᵀ) / √(d_in d_out)``

without ever forming ``G_i``: its cost per sample is ``T (in · d_in + out · d_out + d_in · d_out)`` instead of
``in · out · d``. Still unbiased, but with a larger variance for the same d (the entries of a Kronecker product are
not independent): cheaper, less accurate (see the method page for measurements). The other watched weights (biases,
normalisation scales, the weights of layers without factors) are projected densely with the remaining dimensions.
"""
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from .factor_kernels import compiled_for_batches
from .layer_factors import BatchFactors, LayerFactors

__all__ = ["GradientProjector", "BoundProjection", "BLOCK_ROWS"]

# Rows of R generated at once (part of the definition of R: changing it changes every projection).
BLOCK_ROWS = 1024
# Seed streams: dense blocks of the whole gradient, the factored layers' pairs, the dense rest of a factored model.
_DENSE_STREAM, _LAYER_STREAM, _REST_STREAM = 0, 1, 2
_KINDS = ("rademacher", "gaussian", "srht")
# Largest Hadamard factor applied by one matrix product in the subsampled randomized Hadamard transform.
_HADAMARD_FACTOR_BITS = 7
# The coordinates kept by the SRHT, per (padded size, d, seed, stream): drawn once per process.
_SRHT_COORDINATES: Dict[Tuple[int, int, int, int], np.ndarray] = {}


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def random_block(kind: str, seed: int, stream: int, index: Any, shape: Sequence[int], dtype: tf.DType) -> tf.Tensor:
    """One block of a random matrix with independent entries of mean 0 and variance 1, a deterministic function of
    ``(seed, stream, index)`` and ``shape``: (*shape) of ``dtype`` (``index`` may be a scalar tensor)."""
    key = tf.stack([tf.constant(seed, tf.int64), stream * 2 ** 32 + tf.cast(index, tf.int64)])
    if kind == "rademacher":
        # 32 signs per random word (the bits of uniform 32-bit integers), each bit moved to the sign of the float
        # 1.0: 6x cheaper than one draw per sign.
        rows, columns = shape
        words = tf.random.stateless_uniform((rows, -(-columns // 32)), key, minval=None, maxval=None, dtype=tf.int32)
        shifted = tf.bitwise.left_shift(words[:, :, None], tf.range(32, dtype=tf.int32))
        signs = tf.bitwise.bitwise_and(shifted, tf.constant(-2 ** 31, tf.int32))
        ones = tf.bitcast(tf.bitwise.bitwise_or(signs, tf.constant(0x3F800000, tf.int32)), tf.float32)
        return tf.cast(tf.reshape(ones, (rows, -1))[:, :columns], dtype)
    return tf.cast(tf.random.stateless_normal(shape, key, dtype=tf.float32), dtype)


def srht_plan(size: int, output_dim: int, seed: int, stream: int = _DENSE_STREAM) -> Tuple[int, np.ndarray]:
    """``(P', coordinates)`` of the subsampled randomized Hadamard transform of ``size``-long vectors: the padded
    size ``P' = 2^⌈log2 P⌉`` and the d distinct coordinates kept (sorted, drawn without replacement from the seed by
    NumPy's PCG64: the same in every process).

    Raises
    ------
    ValueError
        If ``output_dim`` exceeds ``P'``.
    """
    padded = 1 << max(0, int(size - 1).bit_length())
    if output_dim > padded:
        raise ValueError(f"kind='srht' keeps output_dim={output_dim} of the {padded} coordinates of the transformed "
                         f"gradient (P = {size} padded to a power of 2): lower output_dim or use kind='rademacher'.")
    key = (padded, int(output_dim), int(seed), int(stream))
    if key not in _SRHT_COORDINATES:
        generator = np.random.Generator(np.random.PCG64([int(seed), int(stream), 0x5348]))
        _SRHT_COORDINATES[key] = np.sort(generator.choice(padded, size=int(output_dim), replace=False))
    return padded, _SRHT_COORDINATES[key]


def _hadamard(bits: int, dtype: tf.DType) -> tf.Tensor:
    """The Sylvester Hadamard matrix of order ``2^bits`` (entries ±1)."""
    matrix = np.ones((1, 1))
    for _ in range(bits):
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return tf.constant(matrix, dtype)


def srht_projection(vectors: tf.Tensor, output_dim: int, seed: int, stream: int = _DENSE_STREAM) -> tf.Tensor:
    """The subsampled randomized Hadamard transform ``√(P'/d) · S H D [g, 0]`` of every row: (B, P) -> (B, d).

    D: P' random signs (from the seed), H: the orthonormal Walsh–Hadamard transform of order P' (applied as a
    Kronecker product of Hadamard matrices of order ≤ 128, one matrix product per factor: ``P' · Σ n_j``
    multiply-adds per row, 256 · P' for P' = 2^14), S: the d coordinates of
    :func:`srht_plan`. Its matrix has entries ±1/√d and orthogonal columns; inner products are preserved in
    expectation over the signs and the coordinates."""
    size = int(vectors.shape[-1])
    padded, coordinates = srht_plan(size, output_dim, seed, stream)
    dtype = vectors.dtype
    signs = random_block("rademacher", seed, stream, 0, (1, padded), dtype)
    rows = tf.pad(vectors, [[0, 0], [0, padded - size]]) * signs
    bits = padded.bit_length() - 1
    factors = -(-bits // _HADAMARD_FACTOR_BITS)
    done = 0
    for factor in range(factors):  # H = H_{n_1} ⊗ ... ⊗ H_{n_k}: one matrix product per axis of (B, n_1, ..., n_k)
        step = bits // factors + (1 if factor < bits % factors else 0)
        right = padded >> (done + step)
        if right == 1:
            rows = tf.matmul(tf.reshape(rows, [-1, 1 << step]), _hadamard(step, dtype))
        else:
            rows = tf.matmul(_hadamard(step, dtype), tf.reshape(rows, [-1, 1 << step, right]))
        done += step
    rows = tf.reshape(rows, [-1, padded]) / tf.cast(np.sqrt(padded), dtype)
    kept = tf.gather(rows, tf.constant(coordinates, tf.int64), axis=1)
    return kept * tf.cast(np.sqrt(padded / output_dim), dtype)


def dense_projection(vectors: tf.Tensor, output_dim: int, kind: str, seed: int, stream: int = _DENSE_STREAM
                     ) -> tf.Tensor:
    """``vectors R / √d`` with R (P, d) generated ``BLOCK_ROWS`` rows at a time (R is the first P rows of the
    blocks 0, 1, ... stacked): (B, P) -> (B, d). ``kind="srht"``: :func:`srht_projection`.

    A loop over the blocks (one block in the graph whatever P), usable in a graph; P must be static."""
    if kind == "srht":
        return srht_projection(vectors, output_dim, seed, stream)
    size = int(vectors.shape[-1])
    count = -(-size // BLOCK_ROWS)
    padded = tf.pad(vectors, [[0, 0], [0, count * BLOCK_ROWS - size]])
    blocks = tf.reshape(tf.transpose(tf.reshape(padded, [-1, count, BLOCK_ROWS]), [1, 0, 2]),
                        [count, -1, BLOCK_ROWS])  # (blocks, B, BLOCK_ROWS)

    def body(index: tf.Tensor, total: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        block = random_block(kind, seed, stream, index, (BLOCK_ROWS, output_dim), vectors.dtype)
        return index + 1, total + tf.matmul(blocks[index], block)

    total = tf.zeros(tf.stack([tf.shape(vectors)[0], output_dim]), vectors.dtype)
    _, total = tf.while_loop(lambda index, _: index < count, body, (tf.constant(0), total))
    return total / tf.cast(np.sqrt(output_dim), vectors.dtype)


def split_dimensions(output_dim: int, kernel_shapes: Sequence[Tuple[int, int]], rest_size: int
                     ) -> Tuple[List[Tuple[int, int]], int]:
    """How a factored projection shares ``output_dim`` between the kernels (in, out) and the other weights.

    Each kernel gets about a share of ``output_dim`` proportional to its size ``in · out`` (of the P watched values),
    as ``d_in × d_out`` with ``d_in / d_out ≈ in / out`` (at least 1, at most the layer's own sizes); the dimensions
    left go to the dense projection of the ``rest_size`` other values (at least 1 when there are any).

    Returns
    -------
    dims, rest_dim
        ``[(d_in, d_out)]`` per kernel and the dimension of the rest; the total ``Σ d_in d_out + rest_dim`` is
        ``output_dim`` when there are other values, at most ``output_dim`` otherwise.

    Raises
    ------
    ValueError
        If ``output_dim`` is smaller than the number of kernels (+ 1 for the other values).
    """
    rest_minimum = 1 if rest_size else 0
    if output_dim < len(kernel_shapes) + rest_minimum:
        raise ValueError(f"output_dim={output_dim} is too small for a factored projection of {len(kernel_shapes)} "
                         f"layer kernels{' and the other weights' if rest_size else ''}: it needs at least "
                         f"{len(kernel_shapes) + rest_minimum} (one per kernel, one for the rest).")
    total_size = sum(rows * columns for rows, columns in kernel_shapes) + rest_size
    dims = []
    for rows, columns in kernel_shapes:
        share = output_dim * rows * columns / total_size
        d_out = int(min(columns, max(1, round(np.sqrt(share * columns / rows)))))
        d_in = int(min(rows, max(1, int(share // d_out))))
        dims.append([d_in, d_out])
    # Minimums of 1 can overshoot: shrink the largest blocks (their longer side) until the total fits.
    while sum(d_in * d_out for d_in, d_out in dims) + rest_minimum > output_dim:
        largest = max(dims, key=lambda pair: pair[0] * pair[1])
        side = 0 if largest[0] >= largest[1] else 1
        largest[side] -= 1
    used = sum(d_in * d_out for d_in, d_out in dims)
    rest_dim = output_dim - used if rest_size else 0
    return [tuple(pair) for pair in dims], rest_dim


class GradientProjector:
    """A seeded random projection of per-sample gradients to ``output_dim`` values, inner products preserved in
    expectation (see the module).

    Parameters
    ----------
    output_dim
        d, the size of the projected vectors (TRAK uses 2,048 to 20,480).
    seed
        Seed of the projection: the same seed gives the same matrix in every process.
    kind
        ``"rademacher"`` (entries ±1, default: cheaper to generate, same guarantee), ``"gaussian"``, or ``"srht"``:
        the subsampled randomized Hadamard transform (random signs, a Walsh–Hadamard transform of the gradient padded
        to ``P' = 2^⌈log2 P⌉`` values, d of its coordinates kept; ``P' · log P'``-like cost per sample instead of
        ``P · d``, entries ±1/√d, orthogonal columns; ``output_dim`` at most P'; dense only).
    factored
        Project the kernels of Dense, EinsumDense, Conv2D and Embedding layers with per-layer Kronecker-factored
        matrices from their inputs and output gradients (never forming the per-sample gradients): much cheaper on
        convolutions and wide layers, less accurate for the same ``output_dim``. Default False (dense).

    Raises
    ------
    ValueError
        ``output_dim`` not an integer >= 1, a negative or non-integer seed, an unknown ``kind``, ``"srht"`` with
        ``factored=True``.
    """

    def __init__(self, output_dim: int = 2048, seed: int = 0, kind: str = "rademacher", factored: bool = False):
        self.output_dim = _check_positive_int(output_dim, "output_dim")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}.")
        self.seed = int(seed)
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
        self.kind = kind
        if not isinstance(factored, bool):
            raise TypeError(f"factored must be a bool, got {type(factored).__name__}.")
        if factored and kind == "srht":
            raise ValueError("kind='srht' transforms whole gradients: it has no Kronecker-factored form; use "
                             "factored=False, or kind='rademacher' / 'gaussian' with factored=True.")
        self.factored = factored

    def configuration(self) -> Dict[str, Any]:
        """What defines the projection (saved with an index, compared when it is loaded)."""
        return {"output_dim": self.output_dim, "seed": self.seed, "kind": self.kind, "factored": self.factored,
                "block_rows": BLOCK_ROWS}

    def __repr__(self) -> str:
        return (f"GradientProjector(output_dim={self.output_dim}, seed={self.seed}, kind={self.kind!r}, "
                f"factored={self.factored})")

    def key(self) -> str:
        """A string identifying the projection (its configuration as JSON)."""
        return json.dumps(self.configuration(), sort_keys=True)

    def project(self, gradients: tf.Tensor) -> tf.Tensor:
        """The dense projection ``g R / √d`` of given vectors: (B, P) -> (B, d) (``factored`` plays no role here).

        Raises
        ------
        ValueError
            If ``gradients`` is not a matrix with a static number of columns.
        """
        gradients = tf.convert_to_tensor(gradients)
        if gradients.shape.rank != 2 or gradients.shape[1] is None:
            raise ValueError(f"gradients must be a (B, P) matrix with a known P, got shape {gradients.shape}.")
        return dense_projection(gradients, self.output_dim, self.kind, self.seed)

    def matrix(self, size: int, dtype: tf.DType = tf.float64) -> tf.Tensor:
        """The dense matrix ``R / √d`` (P, d) materialised, for tests and small P only."""
        return self.project(tf.eye(_check_positive_int(size, "size"), dtype=dtype))

    def bind(self, model: Any) -> "BoundProjection":
        """The projection of one influence model's per-sample gradients (kept with the model: binding the same
        configuration again returns the same compiled functions)."""
        shared = model.layer_factors.shared_functions
        key = ("projection", self.key())
        if key not in shared:
            shared[key] = BoundProjection(self, model)
        return shared[key]

    def project_batch(self, model: Any, batch: Tuple) -> tf.Tensor:
        """The projected per-sample gradients of ``model``'s loss on a batch: (B, :meth:`output_dim_for` (model))."""
        return self.bind(model)(tuple(batch))

    def output_dim_for(self, model: Any, batch: Tuple) -> int:
        """The size of the projected vectors of ``model`` (``output_dim``, or close to it when ``factored``, see
        :func:`split_dimensions`); ``batch`` is any batch (the layers' sizes are read from it)."""
        return self.bind(model).output_dim(tuple(batch))


class BoundProjection:
    """A :class:`GradientProjector` applied to one influence model's per-sample gradients (compiled once, any batch
    size).

    Attributes
    ----------
    layer_dims : list of (int, int) or None
        With ``factored``: ``(d_in, d_out)`` of every factored kernel, in the order of the model's factor plan, once
        a batch was seen.
    rest_dim : int or None
        With ``factored``: the dimension of the dense projection of the other watched weights.
    """

    def __init__(self, projector: GradientProjector, model: Any):
        self.projector = projector
        self.model = model
        self.layer_dims: Optional[List[Tuple[int, int]]] = None
        self.rest_dim: Optional[int] = None
        self._layer_matrices: Optional[List[Optional[Tuple[tf.Tensor, tf.Tensor]]]] = None
        self._compiled: Callable[[Tuple], tf.Tensor] = compiled_for_batches(self._project_in_graph)
        self._compiled_dense: Callable[[tf.Tensor], tf.Tensor] = compiled_for_batches(projector.project)

    # Structure --------------------------------------------------------------------------------------------------
    def _uses_factors(self, batch: Tuple) -> bool:
        return self.model.layer_factors.plan_for(batch).uses_layers

    def _prepare(self, factors: BatchFactors) -> None:
        """With ``factored``, at the first trace: share the dimensions between the factored kernels (static sizes of
        the traced factors) and draw their matrices, eagerly, so that every trace captures the same constants."""
        if self._layer_matrices is not None:
            return
        shapes = [(layer.in_size, layer.out_size) for layer in factors.layers if layer.kernel is not None]
        kernel_size = sum(rows * columns for rows, columns in shapes)
        self.layer_dims, self.rest_dim = split_dimensions(self.projector.output_dim, shapes,
                                                          self.model.nb_params - kernel_size)
        dims = iter(self.layer_dims)
        matrices: List[Optional[Tuple[tf.Tensor, tf.Tensor]]] = []
        with tf.init_scope():  # pylint: disable=not-context-manager
            for index, layer in enumerate(factors.layers):
                matrices.append(self._layer_pair(index, layer, dims))
        self._layer_matrices = matrices

    def _layer_pair(self, index: int, layer: LayerFactors, dims: Any) -> Optional[Tuple[tf.Tensor, tf.Tensor]]:
        """``(R_in, R_out)`` of the ``index``-th factored layer (the next ``(d_in, d_out)`` of ``dims``), or None
        when its kernel is not watched."""
        if layer.kernel is None:
            return None
        d_in, d_out = next(dims)
        projector, dtype = self.projector, self.model.dtype
        return (random_block(projector.kind, projector.seed, _LAYER_STREAM, 2 * index, (layer.in_size, d_in), dtype),
                random_block(projector.kind, projector.seed, _LAYER_STREAM, 2 * index + 1, (layer.out_size, d_out),
                             dtype))

    def _ensure_prepared(self, batch: Tuple) -> None:
        if self.projector.factored and self._layer_matrices is None:
            self(batch)

    def output_dim(self, batch: Tuple) -> int:
        """The size of the projected vectors (with ``factored``, the first call projects ``batch`` once)."""
        self._ensure_prepared(tuple(batch))
        if not self.projector.factored:
            return self.projector.output_dim
        return sum(d_in * d_out for d_in, d_out in self.layer_dims) + self.rest_dim

    def layer_matrices(self, batch: Tuple) -> List[Optional[Tuple[tf.Tensor, tf.Tensor]]]:
        """With ``factored``: ``(R_in (in, d_in), R_out (out, d_out))`` of every factored layer of the plan (None for
        a layer whose kernel is not watched); the kernel's projection is ``vec(R_inᵀ G R_out) / √(d_in d_out)``
        with G its (in, out) per-sample gradient."""
        self._ensure_prepared(tuple(batch))
        return list(self._layer_matrices or [])

    # Projection -------------------------------------------------------------------------------------------------
    def __call__(self, batch: Tuple) -> tf.Tensor:
        """Projected per-sample gradients of one batch: (B, d)."""
        batch = self.model.check_batch(tuple(batch))
        if self.projector.factored and not self._uses_factors(batch):
            raise ValueError("factored=True needs layers with factors (Dense, EinsumDense, Conv2D, Embedding) among "
                             "the watched ones; this model has none: use factored=False.")
        if not self.projector.factored and not self._uses_factors(batch):
            gradients = self.model.batch_jacobian_tensor(batch)
            return self._compiled_dense(gradients)
        return self._compiled(batch)

    def _project_in_graph(self, batch: Tuple) -> tf.Tensor:
        factors = self.model.layer_factors.in_graph(batch)
        if not self.projector.factored:
            return self.projector.project(tf.reshape(factors.gradients(), [-1, self.model.nb_params]))
        self._prepare(factors)
        return self._factored(factors)

    def _factored(self, factors: BatchFactors) -> tf.Tensor:
        projector = self.projector
        parts, rest = [], []
        for layer, matrices in zip(factors.layers, self._layer_matrices):
            if matrices is not None:
                parts.append(_kronecker_projection(layer, *matrices))
            rest.extend(tf.reshape(gradients, [-1, int(np.prod(weight.shape))])
                        for weight, gradients in layer.closed_forms)
        rest.extend(tf.reshape(gradients, [-1, int(np.prod(weight.shape))])
                    for weight, gradients in factors.materialised)
        if self.rest_dim:
            others = tf.concat(rest, axis=1) if len(rest) > 1 else rest[0]
            parts.append(dense_projection(others, self.rest_dim, projector.kind, projector.seed, _REST_STREAM))
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]


def _projected_rows(layer: LayerFactors, in_matrix: tf.Tensor) -> tf.Tensor:
    """``R_inᵀ a_p`` at every position: (B, T, d_in), from token ids, input windows (a convolution's patches never
    concatenated) or the rows."""
    if layer.vocabulary is not None:
        return tf.gather(in_matrix, tf.cast(layer.inputs, tf.int64))
    windows = layer.row_windows() if layer.row_windows is not None else None
    if windows:
        sizes = [int(window.shape[-1]) for window in windows]
        blocks = tf.split(in_matrix, sizes, axis=0)
        return tf.add_n([tf.einsum("btc,cd->btd", window, block) for window, block in zip(windows, blocks)])
    return tf.einsum("btc,cd->btd", layer.inputs, in_matrix)


def _kronecker_projection(layer: LayerFactors, in_matrix: tf.Tensor, out_matrix: tf.Tensor) -> tf.Tensor:
    """``vec(Σ_p (R_inᵀ a_p)(R_outᵀ δ_p)ᵀ) / √(d_in d_out)``: (B, d_in · d_out), row-major."""
    rows = _projected_rows(layer, in_matrix)
    deltas = tf.einsum("bto,od->btd", layer.output_gradients, out_matrix)
    product = tf.matmul(rows, deltas, transpose_a=True)  # (B, d_in, d_out)
    scale = tf.cast(np.sqrt(float(in_matrix.shape[1] * out_matrix.shape[1])), product.dtype)
    return tf.reshape(product, tf.stack([tf.shape(product)[0], -1])) / scale
