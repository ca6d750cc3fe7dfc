"""Fisher information of a classifier as a curvature operator: positive semi-definite, from per-sample gradients.

For a softmax classifier trained with the cross-entropy, with ``g_c(z)`` the gradient of the loss of sample z as if
its label were c and ``p_c(z)`` the predicted probability of c:

* the **true Fisher** ``F = 1/N Σ_z Σ_c p_c(z) g_c(z) g_c(z)ᵀ`` equals the generalised Gauss–Newton matrix
  ``1/N Σ_z J(z)ᵀ (diag(p) - p pᵀ) J(z)`` (J: Jacobian of the logits), the Hessian without the terms of second
  derivatives of the network; it costs C per-sample gradient passes;
* the **empirical Fisher** ``1/N Σ_z g_y(z) g_y(z)ᵀ`` uses the observed label only (one pass).

Both are positive semi-definite, so ``F + λI`` is positive definite for every λ > 0: the exact solver factorises it by
Cholesky, conjugate gradients converge, LiSSA does not diverge. Use them as ``curvature=`` of any solver
(``ExactIHVP(model, curvature=FisherOperator(model, train_set), regularization=λ)``).
"""
from typing import Optional, Tuple

import tensorflow as tf

from .curvature import CurvatureOperator
from .executor import Executor
from .memory import DEFAULT_MEMORY_BUDGET_BYTES
from .model_wrappers import BaseInfluenceModel
from ..utils.tf_operations import assert_batched_dataset, assert_known_cardinality

FISHER_KINDS = ("true", "empirical")


def _loss_from_logits(loss_function: object) -> Optional[bool]:
    """``from_logits`` of a Keras cross-entropy (None when the loss does not say)."""
    settings = getattr(loss_function, "_fn_kwargs", None) or {}
    value = settings.get("from_logits", getattr(loss_function, "from_logits", None))
    return None if value is None else bool(value)


class FisherOperator(CurvatureOperator):
    """The mean Fisher information of a classifier over ``train_set`` (see the module docstring).

    Parameters
    ----------
    model
        Influence model of a classifier trained with a (sparse) categorical cross-entropy.
    train_set
        Batched, finite dataset of ``(inputs, labels)``; labels one-hot (B, C) or sparse (B,) / (B, 1), as the loss
        expects them.
    kind
        ``"true"`` (the Gauss–Newton matrix; C gradient passes) or ``"empirical"`` (observed labels; one pass).
    from_logits
        Whether the model outputs logits (True) or probabilities (False), for the true Fisher's ``p``; None reads
        it from the Keras loss.
    memory_budget_bytes
        Of the executor (a batch's (C·B, P) gradient rows are held at once).
    verbose
        Progress bars of the passes over ``train_set`` (None: interactive sessions only).

    Raises
    ------
    ValueError
        On an unknown ``kind``, or when the true Fisher cannot tell whether the model outputs logits.
    """

    def __init__(self, model: BaseInfluenceModel, train_set: tf.data.Dataset, kind: str = "true",
                 from_logits: Optional[bool] = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                 verbose: Optional[bool] = None):
        super().__init__(model)
        if kind not in FISHER_KINDS:
            raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}.")
        assert_batched_dataset(train_set, "train_set")
        assert_known_cardinality(train_set, "train_set")
        if kind == "true":
            from_logits = _loss_from_logits(model.loss_function) if from_logits is None else bool(from_logits)
            if from_logits is None:
                raise ValueError("FisherOperator(kind='true') needs the predicted probabilities: pass from_logits=True "
                                 "(the model outputs logits) or False (probabilities); the loss does not say.")
        self.kind = kind
        self.from_logits = from_logits
        self.train_set = train_set
        self._executor = Executor(verbose=verbose, memory_budget_bytes=memory_budget_bytes, strategy=model.strategy)

    def gradient_rows(self, batch: Tuple) -> tf.Tensor:
        """Rows R whose Gram matrix ``Rᵀ R`` is the batch's summed Fisher: (B, P) (empirical) or (C·B, P) (true)."""
        if self.kind == "empirical":
            return self.model.batch_jacobian_tensor(batch)
        inputs, labels = batch[0], batch[1]
        outputs = tf.cast(self.model(inputs), self.dtype)
        probabilities = tf.nn.softmax(outputs, axis=-1) if self.from_logits else outputs
        nb_classes = int(outputs.shape[-1])
        sparse = labels.shape.rank == 1 or int(labels.shape[-1]) == 1  # class indices, not one-hot rows
        rows = []
        for label in range(nb_classes):
            if sparse:
                relabelled = tf.fill(tf.shape(labels), tf.cast(label, labels.dtype))
            else:
                relabelled = tf.broadcast_to(tf.one_hot(label, nb_classes, dtype=labels.dtype), tf.shape(labels))
            gradients = self.model.batch_jacobian_tensor((inputs, relabelled, *batch[2:]))
            rows.append(tf.sqrt(probabilities[:, label])[:, None] * tf.cast(gradients, self.dtype))
        return tf.concat(rows, axis=0)

    def matvec(self, vectors: tf.Tensor) -> tf.Tensor:
        """``F V`` (mean Fisher): (P, K) -> (P, K), streaming the training set."""
        vectors = tf.cast(vectors, self.dtype)
        total, count = self._executor.sum(lambda batch: self._batch_product(batch, vectors), self.train_set,
                                          name="train_set")
        return total / tf.cast(count, self.dtype)

    def _batch_product(self, batch: Tuple, vectors: tf.Tensor) -> tf.Tensor:
        rows = self.gradient_rows(batch)
        return tf.matmul(rows, tf.matmul(rows, vectors), transpose_a=True)

    def dense_sum(self) -> Tuple[tf.Tensor, int]:
        """``(Σ_z F(z) (P, P) float64, N)``: the Gram matrices of the batches' gradient rows."""
        def gram(batch: Tuple) -> tf.Tensor:
            rows = self.gradient_rows(batch)
            return tf.matmul(rows, rows, transpose_a=True)

        total, count = self._executor.sum(gram, self.train_set, "Fisher", name="train_set", accumulate=tf.float64)
        return tf.cast(total, tf.float64), count
