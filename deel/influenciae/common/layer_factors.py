"""Per-sample gradients of a layer's weights on one batch, kept in factored form, and their products.

A weight matrix ``W`` (in, out) used as ``z_{i,p} = a_{i,p} W`` at T positions p of sample i (one position for a
dense layer on features, one per step for a dense layer on sequences, one image patch per output position for a
convolution, one token per position for an embedding, whose rows ``a`` are one-hot) has the per-sample gradient

    ``g_i = Σ_p a_{i,p} δ_{i,p}ᵀ``  with  ``δ_{i,p} = ∂ℓ_i / ∂z_{i,p}``  (the layer's output gradients).

The inner product of two such gradients is either taken in Gram form,
``⟨g_i, g_j⟩ = Σ_{p,q} (a_{i,p} · a_{j,q}) (δ_{i,p} · δ_{j,q})`` (cost ∝ T² (in + out) per pair), or ``g_i`` is
formed by one batched product (cost ∝ T · in · out per sample) and the (B, in · out) gradients are multiplied;
:meth:`LayerFactors.prefers_gram` picks the cheaper one. The other weights of a layer (a bias, a normalisation's
scale and offset) have closed-form per-sample gradients, small enough to be kept materialised.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

Layout = Callable[[tf.Tensor], tf.Tensor]


def _weight_shape(weight: Any) -> Tuple[int, ...]:
    return tuple(int(size) for size in weight.shape)


def _flat(gradients: tf.Tensor) -> tf.Tensor:
    """(B, *shape) -> (B, size), row-major."""
    return tf.reshape(gradients, tf.stack([tf.shape(gradients)[0], -1]))


class LayerFactors:
    """The per-sample gradients of one layer's watched weights on one batch.

    Parameters
    ----------
    layer
        The Keras layer.
    inputs
        Layer inputs ``a``: (B, T, in) floats, or (B, T) integer token ids when ``vocabulary`` is given (one-hot rows
        of width ``in = vocabulary``). None when the layer has no watched kernel.
    output_gradients
        ``δ = ∂ℓ_i / ∂z``, the gradients of each sample's loss with respect to the layer's pre-activation output at
        every position: (B, T, out). None when the layer has no watched kernel.
    kernel
        The watched weight whose per-sample gradient is ``Σ_p a δᵀ`` (in · out values), or None.
    closed_forms
        ``(weight, gradients)`` for the other watched weights, ``gradients`` laid out like the weight: (B, *shape).
    vocabulary
        Number of token ids when ``inputs`` holds ids (an embedding table), None for float rows.
    kernel_layout
        Maps the (B, in, out) gradients to the kernel's own layout (B, *kernel.shape); a row-major reshape when
        None.
    row_moments
        Optional ``dtype -> (Σ a aᵀ, Σ a)`` over the batch and positions computed without ``inputs`` (a stride-1
        convolution's, :mod:`.conv_moments`), else None.
    row_windows
        Optional ``() -> [(B, T, in_u)]``, blocks of columns whose concatenation is ``inputs`` (a convolution's
        input windows, one per kernel offset): products with the rows without forming them. Else None.

    Attributes
    ----------
    weights : list
        The watched weights held here: the kernel first (when watched), then the others.
    """

    def __init__(self, layer: Any, inputs: Optional[tf.Tensor], output_gradients: Optional[tf.Tensor],
                 kernel: Any = None, closed_forms: Sequence[Tuple[Any, tf.Tensor]] = (),
                 vocabulary: Optional[int] = None, kernel_layout: Optional[Layout] = None,
                 row_moments: Optional[Callable[[tf.DType], Tuple[tf.Tensor, tf.Tensor]]] = None,
                 row_windows: Optional[Callable[[], List[tf.Tensor]]] = None):
        if kernel is not None and (inputs is None or output_gradients is None):
            raise ValueError(f"Layer {getattr(layer, 'name', layer)!r}: a kernel needs inputs and output gradients.")
        self.layer = layer
        self.inputs = inputs
        self.output_gradients = output_gradients
        self.kernel = kernel
        self.closed_forms = list(closed_forms)
        self.vocabulary = vocabulary
        self.kernel_layout = kernel_layout
        self.row_moments = row_moments
        self.row_windows = row_windows
        self.weights: List[Any] = ([kernel] if kernel is not None else []) + [w for w, _ in self.closed_forms]

    # Sizes and the choice of product form -----------------------------------------------------------------------
    @property
    def positions(self) -> Optional[int]:
        """T, the number of positions per sample, when known statically."""
        return None if self.output_gradients is None else self.output_gradients.shape[1]

    @property
    def in_size(self) -> int:
        """Width of the rows ``a`` (the vocabulary size for token ids)."""
        if self.vocabulary is not None:
            return int(self.vocabulary)
        return 0 if self.inputs is None else int(self.inputs.shape[-1])

    @property
    def out_size(self) -> int:
        """Width of the output gradients ``δ``."""
        return 0 if self.output_gradients is None else int(self.output_gradients.shape[-1])

    def prefers_gram(self, pairwise: bool) -> bool:
        """Whether the Gram form costs less than forming ``g_i``: ``T² (in + out)`` against ``in · out`` per pair
        (``pairwise``), ``T² (in + out)`` against ``T · in · out + in · out`` per sample for squared norms. A row of
        token ids costs 1 instead of ``in``."""
        positions = self.positions
        if positions == 1:
            return True
        if positions is None:
            return False
        row_cost = 1 if self.vocabulary is not None else self.in_size
        gram = positions * positions * (row_cost + self.out_size)
        size = self.in_size * self.out_size
        return gram <= size if pairwise else gram <= positions * row_cost * self.out_size + size

    # Materialised gradients --------------------------------------------------------------------------------------
    def formed_kernel(self) -> tf.Tensor:
        """Per-sample gradients of the kernel as flattened (in, out) matrices: (B, in · out)."""
        count = tf.shape(self.output_gradients)[0]
        if self.vocabulary is not None:
            # Token t at sample i adds δ to row i · vocabulary + t of a (B · vocabulary, out) table.
            rows = tf.cast(self.inputs, tf.int64) + tf.range(tf.cast(count, tf.int64))[:, None] * self.vocabulary
            table = tf.math.unsorted_segment_sum(tf.reshape(self.output_gradients, [-1, self.out_size]),
                                                 tf.reshape(rows, [-1]), tf.cast(count, tf.int64) * self.vocabulary)
            return tf.reshape(table, tf.stack([count, self.in_size * self.out_size]))
        if self.row_windows is not None:  # a convolution's: one product per kernel offset, the patches not formed
            product = tf.concat([tf.matmul(window, self.output_gradients, transpose_a=True)
                                 for window in self.row_windows()], axis=1)
        else:
            product = tf.matmul(self.inputs, self.output_gradients, transpose_a=True)  # (B, in, out)
        return tf.reshape(product, tf.stack([count, self.in_size * self.out_size]))

    def kernel_gradients(self) -> tf.Tensor:
        """Per-sample gradients of the kernel, laid out like it: (B, *kernel.shape)."""
        if self.kernel is None:
            raise ValueError(f"Layer {self.layer.name!r} has no watched kernel.")
        count = tf.shape(self.output_gradients)[0]
        matrix = tf.reshape(self.formed_kernel(), tf.stack([count, self.in_size, self.out_size]))
        if self.kernel_layout is not None:
            return self.kernel_layout(matrix)
        return tf.reshape(matrix, tf.concat([[count], _weight_shape(self.kernel)], axis=0))

    def per_sample_gradients(self) -> List[tf.Tensor]:
        """Per-sample gradients of every weight in :attr:`weights`, each laid out like its weight: (B, *shape)."""
        kernel = [self.kernel_gradients()] if self.kernel is not None else []
        return kernel + [gradients for _, gradients in self.closed_forms]

    def flat_gradients(self) -> tf.Tensor:
        """Per-sample gradients of :attr:`weights`, flattened row-major and concatenated: (B, Σ sizes)."""
        return tf.concat([_flat(gradients) for gradients in self.per_sample_gradients()], axis=1)

    # Products ----------------------------------------------------------------------------------------------------
    def _row_products(self, other: "LayerFactors") -> tf.Tensor:
        """``a_{i,p} · a_{j,q}``: (B_self, B_other, T, T')."""
        if self.vocabulary is not None:
            same = tf.equal(self.inputs[:, None, :, None], other.inputs[None, :, None, :])
            return tf.cast(same, self.output_gradients.dtype)
        return tf.einsum("ipk,jqk->ijpq", self.inputs, other.inputs)

    def _kernel_pairwise(self, other: "LayerFactors") -> tf.Tensor:
        if self.positions == 1 and self.vocabulary is None:
            return tf.matmul(self.inputs[:, 0], other.inputs[:, 0], transpose_b=True) \
                * tf.matmul(self.output_gradients[:, 0], other.output_gradients[:, 0], transpose_b=True)
        if self.prefers_gram(pairwise=True):
            deltas = tf.einsum("ipk,jqk->ijpq", self.output_gradients, other.output_gradients)
            return tf.reduce_sum(self._row_products(other) * deltas, axis=[2, 3])
        return tf.matmul(self.formed_kernel(), other.formed_kernel(), transpose_b=True)

    def _kernel_squared_norms(self) -> tf.Tensor:
        if self.positions == 1 and self.vocabulary is None:
            return tf.reduce_sum(tf.square(self.inputs[:, 0]), axis=1) \
                * tf.reduce_sum(tf.square(self.output_gradients[:, 0]), axis=1)
        if self.prefers_gram(pairwise=False):
            if self.vocabulary is not None:
                rows = tf.cast(tf.equal(self.inputs[:, :, None], self.inputs[:, None, :]), self.output_gradients.dtype)
            else:
                rows = tf.matmul(self.inputs, self.inputs, transpose_b=True)
            deltas = tf.matmul(self.output_gradients, self.output_gradients, transpose_b=True)
            return tf.reduce_sum(rows * deltas, axis=[1, 2])
        return tf.reduce_sum(tf.square(self.formed_kernel()), axis=1)

    def pairwise(self, other: "LayerFactors") -> tf.Tensor:
        """``Σ_w ⟨g_i(w), g_j(w)⟩`` over the weights of this layer, for every sample i here and j of ``other`` (the
        same layer on another batch): (B_self, B_other)."""
        if other.layer is not self.layer or len(other.weights) != len(self.weights):
            raise ValueError(f"Products need the factors of one layer with the same weights: {self.layer.name!r} "
                             f"against {other.layer.name!r}.")
        terms = [self._kernel_pairwise(other)] if self.kernel is not None else []
        terms += [tf.matmul(_flat(mine), _flat(theirs), transpose_b=True)
                  for (_, mine), (_, theirs) in zip(self.closed_forms, other.closed_forms)]
        return tf.add_n(terms)

    def squared_norms(self) -> tf.Tensor:
        """``Σ_w ‖g_i(w)‖²`` over the weights of this layer: (B,)."""
        terms = [self._kernel_squared_norms()] if self.kernel is not None else []
        terms += [tf.reduce_sum(tf.square(_flat(gradients)), axis=1) for _, gradients in self.closed_forms]
        return tf.add_n(terms)


class BatchFactors:
    """Per-sample gradients of every watched weight of a model on one batch: factors for the layers that have
    them, materialised gradients for the other weights.

    Parameters
    ----------
    watched
        The watched weights, in the order of the model's flat gradient layout.
    layers
        One :class:`LayerFactors` per factored layer.
    materialised
        ``(weight, gradients)`` for the other watched weights, flattened row-major: (B, size).
    """

    def __init__(self, watched: Sequence[Any], layers: Sequence[LayerFactors],
                 materialised: Sequence[Tuple[Any, tf.Tensor]]):
        self.watched = list(watched)
        self.layers = list(layers)
        self.materialised = list(materialised)
        held = [id(weight) for factors in self.layers for weight in factors.weights]
        held += [id(weight) for weight, _ in self.materialised]
        if sorted(held) != sorted(id(weight) for weight in self.watched):
            raise ValueError("The factors must hold every watched weight exactly once.")

    def layer_factors_of(self, weight: Any) -> Optional[LayerFactors]:
        """The factors holding ``weight``, or None when its per-sample gradients are materialised."""
        for factors in self.layers:
            if any(held is weight for held in factors.weights):
                return factors
        return None

    def materialised_matrix(self) -> Optional[tf.Tensor]:
        """The materialised gradients side by side: (B, Σ sizes), or None."""
        if not self.materialised:
            return None
        return tf.concat([gradients for _, gradients in self.materialised], axis=1)

    def gradients(self) -> tf.Tensor:
        """Per-sample gradients of the watched weights, flattened row-major and concatenated in the watched order
        (the layout of ``InfluenceModel.batch_jacobian_tensor``): (B, P)."""
        parts: Dict[int, tf.Tensor] = {}
        for factors in self.layers:
            for weight, gradients in zip(factors.weights, factors.per_sample_gradients()):
                parts[id(weight)] = _flat(gradients)
        for weight, gradients in self.materialised:
            parts[id(weight)] = gradients
        return tf.concat([parts[id(weight)] for weight in self.watched], axis=1)

    def pairwise(self, other: "BatchFactors") -> tf.Tensor:
        """``⟨g_i, g_j⟩`` over every watched weight, for every sample i here and j of ``other`` (the same model on
        another batch): (B_self, B_other)."""
        terms = [mine.pairwise(theirs) for mine, theirs in zip(self.layers, other.layers)]
        mine_matrix, their_matrix = self.materialised_matrix(), other.materialised_matrix()
        if mine_matrix is not None:
            terms.append(tf.matmul(mine_matrix, their_matrix, transpose_b=True))
        return tf.add_n(terms)

    def squared_norms(self) -> tf.Tensor:
        """``‖g_i‖²`` over every watched weight: (B,)."""
        terms = [factors.squared_norms() for factors in self.layers]
        matrix = self.materialised_matrix()
        if matrix is not None:
            terms.append(tf.reduce_sum(tf.square(matrix), axis=1))
        return tf.add_n(terms)
