"""Pairwise values and top-k with the test side held and the training side streamed, in one training pass.

A calculator compares a test-side representation of the samples to evaluate with the training samples, one
training batch at a time: nothing of size N × D (N training samples, D the influence-vector size: P for influence
functions, checkpoints × P for TracIn) is ever held. The test side (T × D) is held whole when it fits the
calculator's ``memory_budget_bytes``, else in chunks of test batches, each chunk one pass over the training set.

Hooks (defaults in :class:`TrainStreaming`, overridden where a method has a cheaper form):

* ``_streamed_test_side(batches) -> Any``: the representation of a list of test batches (default: the
  concatenated ``_preprocess_samples``);
* ``_streamed_block(test_side, train_batch) -> (T, B)``: the values of one training batch for every held test
  sample (default: ``_estimate_influence_value_from_influence_vector`` of the batch's influence vectors).
"""
from typing import Any, Iterator, List, Optional, Tuple

import tensorflow as tf

from ..utils.nearest_neighbors import initial_top_k_state, merge_top_k
from ..utils.sorted_dict import ORDER
from ..utils.batch_checks import compute_batches
from ..utils.tf_operations import dataset_size
from .distribution import calculator_strategy
from .executor import Executor, concat_structures, first_dim
from .memory import DEFAULT_MEMORY_BUDGET_BYTES, structure_bytes
from .model_wrappers import assert_finite

__all__ = ["TrainStreaming", "ragged_by_batches", "concat_structures", "first_dim"]


class TrainStreaming:  # pylint: disable=no-member
    """Mixin of :class:`~deel.influenciae.common.BaseInfluenceCalculator`: pairwise matrices and top-k computed
    in one pass over the training set per chunk of test samples.

    Attributes
    ----------
    memory_budget_bytes : int
        Bytes the held test side may take (default 4 GiB); above it, the test set is processed in chunks.
    verbose : bool or None
        Progress bars over the training passes: None (default) shows them in interactive sessions only.
    """

    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    verbose: Optional[bool] = None

    # Hooks --------------------------------------------------------------------------------------
    def _streamed_test_side(self, batches: List[Tuple]) -> Any:
        """Test-side representation of a list of test batches: (T, D) or a structure of such tensors."""
        return concat_structures([self._preprocess_samples(batch) for batch in batches])

    def _streamed_block(self, test_side: Any, train_batch: Tuple) -> tf.Tensor:
        """Values of every training sample of a batch for every held test sample: (T, B)."""
        return self._estimate_influence_value_from_influence_vector(test_side,
                                                                    self._compute_influence_vector(train_batch))

    # Machinery ----------------------------------------------------------------------------------
    def _streaming_executor(self) -> Executor:
        return Executor(None, self.verbose, self.memory_budget_bytes, calculator_strategy(self))

    def _test_side_bytes_per_sample(self) -> Optional[int]:
        """Bytes of the test side of one sample when known beforehand (then the test side of a whole chunk is
        computed at once, e.g. one solve for all its samples); None: measured batch by batch."""
        return None

    def _test_chunks(self, dataset_to_evaluate: tf.data.Dataset) -> Iterator[Tuple[List[Tuple], Any]]:
        """``(test batches, their test side)`` in chunks whose test side fits ``memory_budget_bytes``."""
        executor = self._streaming_executor()
        per_sample = self._test_side_bytes_per_sample()  # pylint: disable=assignment-from-none
        batches: List[Tuple] = []
        sides: List[Any] = []
        held = 0
        for batch in executor.batches(dataset_to_evaluate):
            batches.append(batch)
            if per_sample is None:
                sides.append(self._streamed_test_side([batch]))
                held += structure_bytes(sides[-1])
            else:
                held += per_sample * first_dim(batch)
            if held >= self.memory_budget_bytes:
                yield batches, concat_structures(sides) if sides else self._streamed_test_side(batches)
                batches, sides, held = [], [], 0
        if batches:
            yield batches, concat_structures(sides) if sides else self._streamed_test_side(batches)

    def _train_blocks(self, test_side: Any, train_set: tf.data.Dataset, description: str
                      ) -> Iterator[Tuple[tf.Tensor, Tuple]]:
        """``(values (T, B), training batch)`` for every training batch, with a progress bar."""
        executor = self._streaming_executor()
        for block, batch in executor.map_with_batches(lambda batch: self._streamed_block(test_side, batch), train_set,
                                                      description, axis=1):
            assert_finite(block, "influence values")
            yield block, batch

    def _streamed_matrix(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset) -> tf.Tensor:
        """All pairwise values (N_test, N_train), streaming the training set."""
        rows = []
        for _, test_side in self._test_chunks(dataset_to_evaluate):
            columns = [block for block, _ in self._train_blocks(test_side, train_set, "influence matrix")]
            if not columns:
                raise ValueError("train_set is empty.")
            rows.append(tf.concat(columns, axis=1))
        if not rows:
            raise ValueError("dataset_to_evaluate is empty.")
        return tf.concat(rows, axis=0)

    def _streamed_symmetric_matrix(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset
                                   ) -> tf.Tensor:
        """:meth:`_streamed_matrix` for methods whose value is symmetric in its two samples (``I(t, z) = I(z, t)``,
        e.g. ``g(t)ᵀ H⁻¹ g(z)``): the smaller of the two sets is held (its test side is the expensive one: a solve
        per sample) and the other streamed; equal sizes hold the test set. Sizes are read without computing
        anything when the cardinalities are known."""
        try:
            train_size, test_size = dataset_size(train_set), dataset_size(dataset_to_evaluate)
        except (TypeError, ValueError):
            return self._streamed_matrix(dataset_to_evaluate, train_set)
        if train_size == 0:
            raise ValueError("train_set is empty.")
        if train_size < test_size:
            # The training set is held and the test set streamed: the roles swap.
            return tf.transpose(self._streamed_matrix(train_set, dataset_to_evaluate))  # pylint: disable=W1114
        return self._streamed_matrix(dataset_to_evaluate, train_set)

    def _streamed_top_k(self, dataset_to_evaluate: tf.data.Dataset, train_set: tf.data.Dataset, k: int,
                        order: ORDER, d_type: Optional[tf.DType]) -> Tuple[List[Tuple], tf.Tensor, Any, tf.Tensor]:
        """``(test batches, values (T, k), training inputs (T, k, *x_shape), indices (T, k))``, best first."""
        keys_spec = train_set.element_spec[0]
        all_batches, values, keys, indices = [], [], [], []
        for batches, test_side in self._test_chunks(dataset_to_evaluate):
            count = sum(first_dim(batch) for batch in batches)
            state = None if d_type is None else initial_top_k_state(count, k, keys_spec, d_type, order)
            for block, batch in self._train_blocks(test_side, train_set, "top-k"):
                if state is None:  # values in the dtype the method computes
                    state = initial_top_k_state(count, k, keys_spec, block.dtype, order)
                state = merge_top_k(state, tf.cast(block, state[0].dtype), batch[0], k, order)
            if state is None:
                raise ValueError("train_set is empty.")
            if int(state[3]) < k:
                raise ValueError(f"k={k} is larger than the number of training samples ({int(state[3])}).")
            all_batches.extend(batches)
            values.append(state[0])
            keys.append(state[2])
            indices.append(state[1])
        if not all_batches:
            raise ValueError("dataset_to_evaluate is empty.")
        return all_batches, tf.concat(values, 0), concat_structures(keys), tf.concat(indices, 0)

    def _vectors_fit_in_memory(self, train_set: tf.data.Dataset) -> bool:
        """Whether the training set's influence vectors (N × bytes of the first batch's per sample) fit
        ``memory_budget_bytes``; True when the dataset's size cannot be known without a pass."""
        try:
            size = dataset_size(train_set)
        except (ValueError, TypeError):
            return True
        first = next(iter(compute_batches(train_set.take(1))), None)
        if first is None:
            return True
        vectors = self._compute_influence_vector(tuple(first))
        per_sample = structure_bytes(vectors) / max(1, first_dim(first))
        return per_sample * size <= self.memory_budget_bytes


def ragged_by_batches(batches: List[Tuple], *per_sample: Any) -> tf.data.Dataset:
    """A dataset with one element per test batch: ``(batch, *rows of each per-sample structure)``."""
    lengths = tf.constant([first_dim(batch) for batch in batches], tf.int64)
    structures = (concat_structures(batches),) + per_sample
    ragged = tf.nest.map_structure(lambda tensor: tf.RaggedTensor.from_row_lengths(tensor, lengths), structures)
    return tf.data.Dataset.from_tensor_slices(ragged)
