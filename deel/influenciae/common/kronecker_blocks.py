"""Kronecker-factored blocks of a model's curvature: which weights form a block, and the per-batch statistics.

A layer whose weight ``W`` (in, out) enters as ``z_{i,p} = a_{i,p} W`` at T positions p of sample i (a dense
layer, a convolution's image patches, an ``EinsumDense`` projection, an embedding's one-hot tokens) has per-sample
gradients ``G_i = Σ_p a_{i,p} δ_{i,p}ᵀ`` (:mod:`.layer_factors`). Its block of the mean Fisher
``F = 1/N Σ_i vec(G_i) vec(G_i)ᵀ`` is approximated (Martens & Grosse 2015; Grosse & Martens 2016 for the
positions of a convolution) by

    ``F ≈ A ⊗ S``,  ``A = 1/(N T) Σ_{i,p} a_{i,p} a_{i,p}ᵀ`` (in, in),  ``S = 1/N Σ_{i,p} δ_{i,p} δ_{i,p}ᵀ`` (out, out),

with a homogeneous coordinate 1 appended to ``a`` when the layer's bias is watched (``∂ℓ/∂b = Σ_p δ_p``: the bias
is one more row of ``W``). An embedding's rows are one-hot, so its ``A`` is diagonal: the frequency of each token.

EK-FAC (George et al. 2018) keeps the eigenvectors ``Q_A``, ``Q_S`` and refits the eigenvalues:
``Λ = 1/N Σ_i (Q_Aᵀ G_i Q_S)²`` (elementwise, (in, out)), the exact diagonal of F in the Kronecker eigenbasis.

This module finds the blocks of an influence model (:func:`find_blocks`) and computes, for one batch, the sums
those means are made of; :mod:`.kfac_ihvp` accumulates them and applies the inverse.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from .factor_kernels import _watched_kernel  # pylint: disable=protected-access
from .layer_factors import LayerFactors
from .model_wrappers import BaseInfluenceModel

UNSUPPORTED_CHOICES = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class KroneckerBlock:
    """One Kronecker-factored block: a layer's kernel and, when watched, its bias.

    Attributes
    ----------
    name
        The layer's name.
    layer_type
        Its class name.
    factor_index
        Position of the layer among the factored layers of the model's factor plan.
    kernel_position, bias_position
        Positions of the kernel and the bias (None) among the watched weights.
    in_size, out_size
        Width of the rows ``a`` (without the homogeneous coordinate; the vocabulary for an embedding) and of ``δ``.
    vocabulary
        Number of token ids of an embedding (its ``A`` is diagonal), else None.
    to_matrix
        Permutation taking the kernel's flat values (its own layout) to the row-major (in, out) matrix.
    """

    name: str
    layer_type: str
    factor_index: int
    kernel_position: int
    bias_position: Optional[int]
    in_size: int
    out_size: int
    vocabulary: Optional[int]
    to_matrix: np.ndarray = dataclasses.field(repr=False, compare=False)

    @property
    def homogeneous(self) -> bool:
        """Whether a coordinate 1 is appended to the rows (the bias is a last row of the matrix)."""
        return self.bias_position is not None

    @property
    def rows(self) -> int:
        """Size of ``A``: ``in_size`` (+1 with a bias)."""
        return self.in_size + int(self.homogeneous)

    @property
    def diagonal_rows(self) -> bool:
        """Whether ``A`` is diagonal (an embedding)."""
        return self.vocabulary is not None

    def description(self) -> Dict[str, Any]:
        """The block's fields as JSON-able values (for a saved fit's manifest)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name != "to_matrix"}

    @property
    def nb_params(self) -> int:
        """Weights of the block: ``rows · out_size``."""
        return self.rows * self.out_size


@dataclasses.dataclass(frozen=True)
class BlockStructure:
    """The Kronecker blocks of a model and the watched weights left out of them.

    Attributes
    ----------
    blocks
        The blocks, in the order of the model's factored layers.
    skipped
        Positions of the watched weights outside every block (their curvature is not modelled).
    reasons
        One message per layer (or weight) left out.
    """

    blocks: Tuple[KroneckerBlock, ...]
    skipped: Tuple[int, ...]
    reasons: Tuple[str, ...]


def _matrix_permutation(layer_factors: LayerFactors) -> np.ndarray:
    """``perm`` with ``matrix_flat = kernel_flat[perm]``: the kernel layout applied to the indices of the matrix."""
    in_size, out_size = layer_factors.in_size, layer_factors.out_size
    indices = tf.reshape(tf.range(in_size * out_size, dtype=tf.float64), [1, in_size, out_size])
    if layer_factors.kernel_layout is not None:
        laid_out = layer_factors.kernel_layout(indices)
    else:
        laid_out = tf.reshape(indices, [1, -1])
    matrix_index_of_kernel = np.rint(np.reshape(laid_out.numpy(), [-1])).astype(np.int64)
    return np.argsort(matrix_index_of_kernel)


def _is_homogeneous_bias(factors: LayerFactors, gradients: tf.Tensor) -> bool:
    """Whether a bias's per-sample gradient (B, *shape) is ``Σ_p δ_p`` in the order of δ's columns."""
    if int(np.prod(gradients.shape[1:])) != factors.out_size:
        return False
    deltas = tf.cast(factors.output_gradients, tf.float64)
    summed = tf.reduce_sum(deltas, axis=1)
    flat = tf.reshape(tf.cast(gradients, tf.float64), tf.shape(summed))
    # Relative to Σ_p |δ_p|, not to |Σ_p δ_p|: a bias whose gradient vanishes (an attention key's) is still Σ_p δ_p.
    scale = float(tf.reduce_max(tf.reduce_sum(tf.abs(deltas), axis=1))) or 1.0
    return bool(tf.reduce_max(tf.abs(summed - flat)) <= 1e-5 * scale)


def find_blocks(model: BaseInfluenceModel, batch: Tuple, unsupported: str = "raise") -> BlockStructure:
    """The Kronecker blocks of ``model``'s watched weights, read from the factors of one batch.

    Parameters
    ----------
    model
        The influence model.
    batch
        One batch of the training set (its factors tell which biases are homogeneous coordinates).
    unsupported
        ``"raise"``: a watched weight that no block holds (a normalisation's scale and offset, a layer without
        adapter, a bias that is not ``Σ_p δ``) is a ``ValueError`` naming its layer; ``"skip"``: it is left out of
        the curvature (block-diagonal without it: its part of every inverse product is 0).

    Raises
    ------
    ValueError
        On an unknown ``unsupported``, or, with ``"raise"``, a watched weight outside every block.
    """
    if unsupported not in UNSUPPORTED_CHOICES:
        raise ValueError(f"unsupported_layers must be one of {UNSUPPORTED_CHOICES}, got {unsupported!r}.")
    kernels = model.layer_factors
    plan = kernels.plan_for(batch)
    factors = kernels(batch)
    positions = {id(weight): index for index, weight in enumerate(model.kernels.watched)}
    blocks, reasons, covered = [], [], set()
    for index, (layer_plan, layer_factors) in enumerate(zip(plan.factored, factors.layers)):
        layer = layer_plan.layer
        kernel = _watched_kernel(layer_plan)
        if kernel is None:
            reasons.append(f"{type(layer).__name__} layer {layer.name!r}: no Kronecker factors for its weights "
                           f"({', '.join(weight.name for weight in layer_plan.weights)}).")
            continue
        bias_position = None
        for weight, gradients in layer_factors.closed_forms:
            if weight is getattr(layer, "bias", None) and _is_homogeneous_bias(layer_factors, gradients):
                bias_position = positions[id(weight)]
            else:
                reasons.append(f"{type(layer).__name__} layer {layer.name!r}: its weight {weight.name!r} is not "
                               "a bias added to every position of the output.")
        blocks.append(KroneckerBlock(layer.name, type(layer).__name__, index, positions[id(kernel)], bias_position,
                                     layer_factors.in_size, layer_factors.out_size, layer_factors.vocabulary,
                                     _matrix_permutation(layer_factors)))
        covered.update(position for position in (positions[id(kernel)], bias_position) if position is not None)
    for layer_plan in plan.local:
        reasons.append(f"{type(layer_plan.layer).__name__} layer {layer_plan.layer.name!r}: no layer adapter gives "
                       "its Kronecker factors.")
    if plan.materialised:
        names = [model.kernels.watched[position].path for position in plan.materialised]
        reasons.append(f"Weights {names}: not used as the kernel of a layer with an adapter.")
    skipped = tuple(position for position in range(len(model.kernels.watched)) if position not in covered)
    if skipped and unsupported == "raise":
        raise ValueError("Kronecker-factored curvature covers Dense, EinsumDense, Conv2D and Embedding kernels (and "
                         "their biases); these watched weights are outside every block: " + " ".join(reasons)
                         + " Watch only supported layers, or pass unsupported_layers='skip' to leave them out "
                         "(block-diagonal curvature without them).")
    if not blocks:
        raise ValueError("No watched weight belongs to a layer with Kronecker factors (Dense, EinsumDense, Conv2D, "
                         "Embedding).")
    return BlockStructure(tuple(blocks), skipped, tuple(reasons))


# Per-batch statistics (pure functions of the factors, traced inside compiled functions) -----------------------------
def block_rows(block: KroneckerBlock, rows: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """The rows ``a`` of every position as (B·T, rows) floats, with the homogeneous coordinate (not for ids)."""
    flat = tf.reshape(tf.cast(rows, dtype), [-1, block.in_size])
    if block.homogeneous:
        flat = tf.concat([flat, tf.ones_like(flat[:, :1])], axis=1)
    return flat


def activation_sum(block: KroneckerBlock, layer: LayerFactors, dtype: tf.DType) -> tf.Tensor:
    """``Σ_{i,p} a aᵀ``: (rows, rows) (with the homogeneous coordinate: ``[[Σ a aᵀ, Σ a], [Σ aᵀ, B·T]]``); for token
    ids the diagonal, the count of each token: (vocabulary,). From the layer's ``row_moments`` when it has them
    (a stride-1 convolution: its patches are then not formed), else from its rows."""
    rows = layer.inputs
    if block.diagonal_rows:
        ids = tf.reshape(tf.cast(rows, tf.int32), [-1])
        return tf.math.unsorted_segment_sum(tf.ones_like(ids, dtype=dtype), ids, block.in_size)
    if layer.row_moments is None:
        flat = block_rows(block, rows, dtype)
        return tf.matmul(flat, flat, transpose_a=True)
    products, sums = layer.row_moments(dtype)
    if not block.homogeneous:
        return products
    count = tf.cast(tf.size(layer.output_gradients) // block.out_size, dtype)
    return tf.concat([tf.concat([products, sums[:, None]], axis=1),
                      tf.concat([sums, count[None]], axis=0)[None, :]], axis=0)


def gradient_sum(deltas: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``Σ_{i,p} δ δᵀ``: (out, out)."""
    flat = tf.reshape(tf.cast(deltas, dtype), [-1, deltas.shape[-1]])
    return tf.matmul(flat, flat, transpose_a=True)


def _prefers_forming(block: KroneckerBlock, positions: Optional[int]) -> bool:
    """Whether forming ``G_i`` then rotating it (``T·rows·out + rows²·out + rows·out²`` per sample) costs less than
    rotating the rows and output gradients of every position (``T·(rows² + out² + rows·out)``)."""
    if positions is None:
        return False
    rows, out = block.rows, block.out_size
    return positions * rows * out + rows * rows * out + rows * out * out < positions * (rows * rows + out * out
                                                                                          + rows * out)


def _rotated_transposed(block: KroneckerBlock, layer: LayerFactors, rows_basis: tf.Tensor,
                        outputs_basis: tf.Tensor) -> tf.Tensor:
    """``(Q_Aᵀ G_i Q_S)ᵀ``: (B, out, rows), in the bases' dtype (products that transpose the output gradients, the
    smaller side, rather than the rows)."""
    dtype = outputs_basis.dtype
    deltas = tf.cast(layer.output_gradients, dtype)
    count = tf.shape(deltas)[0]
    deltas = tf.reshape(deltas, tf.stack([count, -1, block.out_size]))
    if _prefers_forming(block, layer.positions):
        if layer.row_windows is not None:  # G_iᵀ from the convolution's input windows, without its patches
            parts = [tf.matmul(deltas, tf.cast(window, dtype), transpose_a=True) for window in layer.row_windows()]
        else:
            rows = tf.reshape(tf.cast(layer.inputs, dtype), tf.stack([count, -1, block.in_size]))
            parts = [tf.matmul(deltas, rows, transpose_a=True)]
        if block.homogeneous:
            parts.append(tf.reduce_sum(deltas, axis=1)[:, :, None])
        transposed = tf.concat(parts, axis=2) if len(parts) > 1 else parts[0]
        return tf.matmul(tf.matmul(outputs_basis, transposed, transpose_a=True), rows_basis)
    flat_rows = block_rows(block, layer.inputs, dtype)
    rotated_rows = tf.reshape(tf.matmul(flat_rows, rows_basis), tf.stack([count, -1, block.rows]))
    rotated_deltas = tf.reshape(tf.matmul(tf.reshape(deltas, [-1, block.out_size]), outputs_basis), tf.shape(deltas))
    return tf.matmul(rotated_deltas, rotated_rows, transpose_a=True)


def rotated_gradients(block: KroneckerBlock, layer: LayerFactors, rows_basis: tf.Tensor,
                      outputs_basis: tf.Tensor) -> tf.Tensor:
    """Per-sample gradients in the Kronecker eigenbasis, ``Q_Aᵀ G_i Q_S = Σ_p (Q_Aᵀ a_p)(Q_Sᵀ δ_p)ᵀ``:
    (B, rows, out), for a block with float rows (not an embedding). With many positions per sample (convolutions)
    ``G_i`` is formed first (from the input windows when the layer has them) and rotated (cheaper); otherwise the
    rows and output gradients are rotated."""
    return tf.transpose(_rotated_transposed(block, layer, rows_basis, outputs_basis), [0, 2, 1])


def _token_sums(block: KroneckerBlock, layer: LayerFactors, outputs_basis: tf.Tensor
                ) -> Tuple[tf.Tensor, tf.Tensor]:
    """An embedding's rotated gradients, one row per (sample, token) present: ``(sums (U, out), slots (U,))`` with
    ``slot = sample · vocabulary + token`` (the (B, vocabulary, out) gradients are never formed)."""
    deltas = layer.output_gradients
    count = tf.shape(deltas)[0]
    rotated = tf.matmul(tf.reshape(tf.cast(deltas, outputs_basis.dtype), [-1, block.out_size]), outputs_basis)
    ids = tf.reshape(tf.cast(layer.inputs, tf.int64), [count, -1])
    slots = tf.reshape(ids + tf.range(tf.cast(count, tf.int64))[:, None] * block.in_size, [-1])
    unique, where = tf.unique(slots)
    return tf.math.unsorted_segment_sum(rotated, where, tf.shape(unique)[0]), unique


def squared_rotated_sum(block: KroneckerBlock, layer: LayerFactors, rows_basis: Optional[tf.Tensor],
                        outputs_basis: tf.Tensor) -> tf.Tensor:
    """``Σ_i (Q_Aᵀ G_i Q_S)²`` (elementwise): (rows, out)."""
    if block.diagonal_rows:
        sums, slots = _token_sums(block, layer, outputs_basis)
        return tf.math.unsorted_segment_sum(tf.square(sums), slots % block.in_size, block.in_size)
    return tf.transpose(tf.reduce_sum(tf.square(_rotated_transposed(block, layer, rows_basis, outputs_basis)),
                                      axis=0))


def weighted_rotated_norms(block: KroneckerBlock, layer: LayerFactors, rows_basis: Optional[tf.Tensor],
                           outputs_basis: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """``Σ_{jk} W_jk (Q_Aᵀ G_i Q_S)_jk²`` for every sample i of the batch: (B,) (W: (rows, out), e.g.
    ``1 / (Λ + λ)`` for the inverse quadratic form)."""
    if block.diagonal_rows:
        sums, slots = _token_sums(block, layer, outputs_basis)
        weighted = tf.reduce_sum(tf.square(sums) * tf.gather(weights, slots % block.in_size), axis=1)
        return tf.math.unsorted_segment_sum(weighted, slots // block.in_size, tf.shape(layer.output_gradients)[0])
    rotated = _rotated_transposed(block, layer, rows_basis, outputs_basis)
    return tf.reduce_sum(tf.square(rotated) * tf.transpose(weights), axis=[1, 2])


def split_vectors(vectors: tf.Tensor, sizes: Sequence[int]) -> List[tf.Tensor]:
    """(K, P) rows split into the watched weights' flat parts: [(K, size)]."""
    return tf.split(vectors, list(sizes), axis=1)


def block_matrices(block: KroneckerBlock, parts: Sequence[tf.Tensor]) -> tf.Tensor:
    """The block's part of K flat vectors as matrices (K, rows, out) (the bias as the last row)."""
    kernel = tf.gather(parts[block.kernel_position], block.to_matrix, axis=1)
    matrices = tf.reshape(kernel, [-1, block.in_size, block.out_size])
    if block.homogeneous:
        matrices = tf.concat([matrices, parts[block.bias_position][:, None, :]], axis=1)
    return matrices


def scatter_matrices(block: KroneckerBlock, matrices: tf.Tensor, parts: List[Optional[tf.Tensor]]) -> None:
    """Write (K, rows, out) matrices back into the flat parts of the block's weights (in place in ``parts``)."""
    kernel = tf.reshape(matrices[:, :block.in_size], [-1, block.in_size * block.out_size])
    parts[block.kernel_position] = tf.gather(kernel, np.argsort(block.to_matrix), axis=1)
    if block.homogeneous:
        parts[block.bias_position] = matrices[:, block.in_size]
