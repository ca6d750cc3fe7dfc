"""Query batching for Kronecker-factored influence: preconditioned test gradients kept as low-rank matrices.

Scoring T test samples against N training samples needs the preconditioned test gradients
``Q_t = (F + λI)⁻¹ g_t``, one (rows, out) matrix per block and test sample: T × P floats in all, the size of T
models. Following Grosse et al. (2023, §3.2.2), each matrix is replaced by its best rank-r approximation (truncated
SVD) ``Q_t ≈ L_t R_tᵀ`` with ``L_t`` (rows, r) and ``R_t`` (out, r): T × r × Σ (rows + out) floats. A training
sample's gradient on the block is ``G_z = Σ_p a_p δ_pᵀ``, so

    ``⟨Q_t, G_z⟩ ≈ Σ_p (a_pᵀ L_t) · (δ_pᵀ R_t)``

is computed from the layer's inputs and output gradients without forming ``G_z``: T · r · (rows + out) per position
instead of rows · out. ``rank=None`` keeps the full matrices (exact; the training gradients are then formed).

Trade-off (the ranks of the digits MLP in ``benchmarks/bench_kfac.py``): the scores' error falls with r as the
singular values of the preconditioned gradients do; a rank of a few units already ranks training samples like the
full matrices on dense layers whose per-sample gradients are rank one.
"""
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from .executor import Executor
from .factor_kernels import compiled_for_batches
from .kfac_ihvp import KFACIHVP
from .kronecker_blocks import KroneckerBlock, block_matrices, block_rows, split_vectors
from ..utils.tf_operations import assert_batched_dataset

BlockQuery = Tuple[tf.Tensor, Optional[tf.Tensor]]


class CompressedQueries:
    """Preconditioned gradients of T test samples, per Kronecker block, optionally compressed to rank r.

    Parameters
    ----------
    solver
        A fitted (or fittable) :class:`~.kfac_ihvp.KFACIHVP` / ``EKFACIHVP``.
    test_set
        Batched dataset of the T test samples.
    rank
        r ≥ 1 to keep the r leading singular directions of each (rows, out) matrix, None for the full matrices.
    verbose
        Progress bars.

    Attributes
    ----------
    queries : list
        Per block, ``(L (T, rows, r), R (T, out, r))``, or ``(Q (T, rows, out), None)`` without compression.
    nb_queries : int
        T.
    """

    def __init__(self, solver: KFACIHVP, test_set: tf.data.Dataset, rank: Optional[int] = None,
                 verbose: Optional[bool] = None):
        if not isinstance(solver, KFACIHVP):
            raise TypeError(f"solver must be a KFACIHVP or EKFACIHVP, got {type(solver).__name__}.")
        if rank is not None and (not isinstance(rank, (int, np.integer)) or rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
        assert_batched_dataset(test_set, "test_set")
        self.solver = solver.fit()
        self.rank = None if rank is None else int(rank)
        self.executor = Executor(verbose=verbose, strategy=solver.model.strategy)
        model = solver.model
        gradients = self.executor.concat(model.batch_jacobian_tensor, test_set, "test gradients", name="test_set")
        preconditioned = tf.transpose(tf.cast(solver.apply_inverse(tf.transpose(gradients)), tf.float64))
        parts = split_vectors(preconditioned, model.kernels.sizes)
        self.queries: List[BlockQuery] = [self._compress(block_matrices(block, parts)) for block in solver.blocks]
        self.nb_queries = int(gradients.shape[0])
        self._score = compiled_for_batches(self._batch_scores)

    def _compress(self, matrices: tf.Tensor) -> BlockQuery:
        """(T, rows, out) -> (L, R) of rank r (singular values folded into L), or the matrices themselves."""
        if self.rank is None or self.rank >= min(matrices.shape[1], matrices.shape[2]):
            return matrices, None
        values, left, right = tf.linalg.svd(matrices)
        rank = self.rank
        return left[:, :, :rank] * values[:, None, :rank], right[:, :, :rank]

    @property
    def stored_floats(self) -> int:
        """Floats held for the T queries (Σ over blocks of T·r·(rows + out), or T·rows·out uncompressed)."""
        return int(sum(int(np.prod(left.shape)) + (0 if right is None else int(np.prod(right.shape)))
                       for left, right in self.queries))

    def _block_scores(self, block: KroneckerBlock, query: BlockQuery, rows: tf.Tensor, deltas: tf.Tensor) -> tf.Tensor:
        """(T, B) scores of one block from a training batch's rows (B, P, in) / ids (B, P) and δ (B, P, out)."""
        left, right = query
        deltas = tf.cast(deltas, tf.float64)
        count = tf.shape(deltas)[0]
        if right is None:  # full matrices: form the batch's gradients on the block
            if block.diagonal_rows:
                ids = tf.cast(rows, tf.int32)
                projected = tf.gather(left, ids, axis=1)  # (T, B, P, out)
                return tf.einsum("tbpo,bpo->tb", projected, deltas)
            flat_rows = tf.reshape(block_rows(block, rows, tf.float64), tf.stack([count, -1, block.rows]))
            gradients = tf.matmul(flat_rows, deltas, transpose_a=True)  # (B, rows, out)
            return tf.einsum("tio,bio->tb", left, gradients)
        if block.diagonal_rows:
            row_side = tf.gather(left, tf.cast(rows, tf.int32), axis=1)  # (T, B, P, r)
        else:
            flat_rows = tf.reshape(block_rows(block, rows, tf.float64), tf.stack([count, -1, block.rows]))
            row_side = tf.einsum("bpi,tir->tbpr", flat_rows, left)
        output_side = tf.einsum("bpo,tor->tbpr", deltas, right)
        return tf.reduce_sum(row_side * output_side, axis=[2, 3])

    def _batch_scores(self, batch: Tuple) -> tf.Tensor:
        factors = self.solver.model.layer_factors.in_graph(batch)
        terms = [self._block_scores(block, query, factors.layers[block.factor_index].inputs,
                                    factors.layers[block.factor_index].output_gradients)
                 for block, query in zip(self.solver.blocks, self.queries)]
        return tf.add_n(terms)

    def scores(self, train_set: tf.data.Dataset) -> tf.Tensor:
        """``g(t)ᵀ (F + λI)⁻¹ g(z)`` (approximated at rank r) for every test sample t and training sample z of
        ``train_set``: (T, N) float64, streaming the training set."""
        assert_batched_dataset(train_set, "train_set")
        blocks = list(self.executor.map(lambda batch: self._score(tuple(batch)), train_set, "query scores",
                                        name="train_set", axis=1))
        return tf.concat(blocks, axis=1)
