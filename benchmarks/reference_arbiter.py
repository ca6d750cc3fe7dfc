"""The float64 arbiter of ``compare_reference.py``: ``g(t)^T pinv(H_mean) g(z)`` from the closed-form gradient and
Hessian of the softmax cross-entropy w.r.t. the last Dense layer, in NumPy."""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

EPS_FLOAT32 = 2.0 ** -23


# -------- Float64 arbiter -----------------------------------------------------------------
def mlp_forward(x: np.ndarray, weights: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Forward pass of the MLP in float64.

    Parameters
    ----------
    x
        Inputs, shape ``(N, D)``.
    weights
        MLP weights in ``get_weights()`` order (ReLU hidden layers, linear last layer).

    Returns
    -------
    tuple
        The input of the last layer ``(N, H)`` and the softmax probabilities ``(N, C)``.
    """
    hidden = x.astype(np.float64)
    params = [np.asarray(weight, dtype=np.float64) for weight in weights]
    for kernel, bias in zip(params[0:-2:2], params[1:-2:2]):
        hidden = np.maximum(hidden @ kernel + bias, 0.0)
    logits = hidden @ params[-2] + params[-1]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return hidden, probs / probs.sum(axis=1, keepdims=True)


def last_layer_terms(x: np.ndarray, y: np.ndarray, weights: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-sample gradients and summed Hessian of the cross-entropy w.r.t. the last Dense layer, in float64.

    With logits ``z = W^T h + b`` (``W`` of shape ``(H, C)``), ``p = softmax(z)`` and ``r = p - y``,
    the gradient is ``(vec(h r^T), r)`` (kernel flattened row-major, then bias, like both libraries)
    and the Hessian is ``J^T (diag(p) - p p^T) J`` with ``J = dz/d(W, b) = [h^T (x) I_C, I_C]``.

    Parameters
    ----------
    x
        Inputs, shape ``(N, D)``.
    y
        One-hot targets, shape ``(N, C)``.
    weights
        MLP weights in ``get_weights()`` order (ReLU hidden layers, linear last layer).

    Returns
    -------
    tuple
        Gradients ``(N, P)`` and the sum over the samples of their Hessians ``(P, P)``.
    """
    hidden, probs = mlp_forward(x, weights)
    residual = probs - y.astype(np.float64)
    n_samples, n_classes = probs.shape
    grads = np.concatenate([np.einsum("ni,nk->nik", hidden, residual).reshape(n_samples, -1), residual], axis=1)
    eye = np.eye(n_classes)
    jac = np.concatenate([np.reshape(np.einsum("ni,kl->nkil", hidden, eye), (n_samples, n_classes, -1)),
                          np.broadcast_to(eye, (n_samples, n_classes, n_classes))], axis=2)
    curvature = probs[:, :, None] * eye - probs[:, :, None] * probs[:, None, :]
    return grads, np.einsum("nkp,nkl,nlq->pq", jac, curvature, jac)


@dataclass
class Arbiter:
    """Float64 ground truth ``g(t)^T pinv(H_mean) g(z)`` for one pseudo-inverse cut-off.

    Attributes
    ----------
    name
        Label used in the report.
    rcond
        Eigenvalues with ``|lambda| <= rcond * max|lambda|`` are dropped (the rule of
        ``tf.linalg.pinv`` applied to singular values, which are ``|lambda|`` here).
    self_influence
        ``(N_train,)`` self-influence values.
    pairwise
        ``(N_test, N_train)`` influence values.
    rank
        Number of eigenvalues kept.
    margin
        How far the eigenvalue closest to the cut-off ``c = rcond * max|lambda|`` lies from it, as a
        ratio: ``min over lambda of max(|lambda| / c, c / |lambda|)`` (>= 1). Close to 1 (below ~1.01),
        float32 rounding can move that eigenvalue across the cut-off and change the values by O(1).
    """

    name: str
    rcond: float
    self_influence: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    pairwise: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    rank: int = 0
    margin: float = 1.0

    def solve(self, hessian: np.ndarray, train_grads: np.ndarray, test_grads: np.ndarray) -> "Arbiter":
        """Fill the values from the mean Hessian and the gradients.

        Parameters
        ----------
        hessian
            Mean Hessian ``(P, P)``, float64.
        train_grads
            Training gradients ``(N_train, P)``.
        test_grads
            Test gradients ``(N_test, P)``.

        Returns
        -------
        Arbiter
            ``self``, filled.
        """
        eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (hessian + hessian.T))
        cutoff = self.rcond * np.abs(eigenvalues).max()
        keep = np.abs(eigenvalues) > cutoff
        influence_vectors = train_grads @ ((eigenvectors[:, keep] / eigenvalues[keep]) @ eigenvectors[:, keep].T)
        self.self_influence = np.einsum("np,np->n", influence_vectors, train_grads)
        self.pairwise = test_grads @ influence_vectors.T
        self.rank = int(keep.sum())
        with np.errstate(divide="ignore"):
            ratios = np.abs(eigenvalues) / cutoff
            self.margin = float(np.min(np.maximum(ratios, 1.0 / ratios)))
        return self


def compute_arbiters(data: Dict[str, np.ndarray], weights: List[np.ndarray], exact_rcond: float) -> List[Arbiter]:
    """Float64 values with the pinv cut-off of TF/NumPy for float32 and with a null-space-only cut-off.

    Parameters
    ----------
    data
        Train/test arrays.
    weights
        Model weights.
    exact_rcond
        Cut-off of the ``"f64 exact"`` arbiter (small enough to drop only the exact null space).

    Returns
    -------
    list of Arbiter
        ``"f64 pinv"`` (``rcond = 10 P eps_float32``, the default of ``tf.linalg.pinv`` on the
        float32 Hessian that the reference inverts) and ``"f64 exact"``.
    """
    train_grads, hessian_sum = last_layer_terms(data["x_train"], data["y_train"], weights)
    test_grads, _ = last_layer_terms(data["x_test"], data["y_test"], weights)
    hessian = hessian_sum / data["x_train"].shape[0]
    return [Arbiter("f64 pinv", 10.0 * hessian.shape[0] * EPS_FLOAT32).solve(hessian, train_grads, test_grads),
            Arbiter("f64 exact", exact_rcond).solve(hessian, train_grads, test_grads)]
