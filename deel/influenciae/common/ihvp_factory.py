"""Factories that build an IHVP solver once the model and the hessian dataset are known."""
from abc import ABC, abstractmethod
from typing import Optional, Union

import keras
import tensorflow as tf

from .arnoldi_ihvp import ArnoldiIHVP
from .inverse_hessian_vector_product import (ConjugateGradientDescentIHVP, ExactIHVP, InverseHessianVectorProduct,
                                             LissaIHVP)
from .model_wrappers import InfluenceModel


class InverseHessianVectorProductFactory(ABC):
    """Builds an :class:`InverseHessianVectorProduct` for a model and a dataset."""

    @abstractmethod
    def build(self, model_influence: InfluenceModel, dataset: tf.data.Dataset) -> InverseHessianVectorProduct:
        """Return a solver for ``model_influence`` whose Hessian is the mean over ``dataset``."""


class ExactIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`ExactIHVP` solvers (``regularization`` = λ of ``H + λI``)."""

    def __init__(self, regularization: float = 0.0):
        self.regularization = regularization

    def build(self, model_influence: InfluenceModel, dataset: tf.data.Dataset) -> InverseHessianVectorProduct:
        return ExactIHVP(model_influence, dataset, regularization=self.regularization)


def _extractor_settings(feature_extractor: Union[int, str, keras.Model], extractor_layer: Optional[Union[int, str]]):
    """(extractor layer, extractor model) from the factories' two ways of naming the cut."""
    if isinstance(feature_extractor, keras.Model):
        if extractor_layer is None:
            raise ValueError("extractor_layer is required when feature_extractor is a model: it names the first "
                             "layer of the head.")
        return extractor_layer, feature_extractor
    if not isinstance(feature_extractor, (int, str)) or isinstance(feature_extractor, bool):
        raise TypeError("feature_extractor must be a layer index/name or a keras.Model, got "
                        f"{type(feature_extractor).__name__}.")
    return feature_extractor, None


class CGDIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`ConjugateGradientDescentIHVP` solvers.

    Parameters
    ----------
    feature_extractor
        Either the index/name of the first layer of the head (the model is cut there), or a Keras model
        computing the head's input; in the latter case ``extractor_layer`` must name the head's first layer.
    n_cgd_iters
        CG iterations.
    extractor_layer
        See ``feature_extractor``.
    regularization
        λ of ``H + λI``.
    """

    def __init__(self, feature_extractor: Union[int, str, keras.Model] = -1, n_cgd_iters: int = 100,
                 extractor_layer: Optional[Union[int, str]] = None, regularization: float = 0.0):
        self.extractor_layer, self.feature_extractor = _extractor_settings(feature_extractor, extractor_layer)
        self.n_cgd_iters = n_cgd_iters
        self.regularization = regularization

    def build(self, model_influence: InfluenceModel, dataset: tf.data.Dataset) -> InverseHessianVectorProduct:
        return ConjugateGradientDescentIHVP(model_influence, self.extractor_layer, dataset, self.n_cgd_iters,
                                            self.feature_extractor, regularization=self.regularization)


class LissaIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`LissaIHVP` solvers (arguments as :class:`CGDIHVPFactory`, plus ``damping`` and ``scale``)."""

    def __init__(self, feature_extractor: Union[int, str, keras.Model] = -1, n_cgd_iters: int = 100,
                 extractor_layer: Optional[Union[int, str]] = None, damping: float = 1e-4, scale: float = 10.,
                 regularization: float = 0.0):
        self.extractor_layer, self.feature_extractor = _extractor_settings(feature_extractor, extractor_layer)
        self.n_cgd_iters = n_cgd_iters
        self.damping = damping
        self.scale = scale
        self.regularization = regularization

    def build(self, model_influence: InfluenceModel, dataset: tf.data.Dataset) -> InverseHessianVectorProduct:
        return LissaIHVP(model_influence, self.extractor_layer, dataset, self.n_cgd_iters, self.feature_extractor,
                         damping=self.damping, scale=self.scale, regularization=self.regularization)


class ArnoldiIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`~deel.influenciae.common.ArnoldiIHVP` solvers.

    Parameters
    ----------
    subspace_dim
        Dimension of the Krylov space (default ``min(P, 200)``).
    k_largest_eig_vals
        Number of Ritz pairs of largest magnitude kept (default ``subspace_dim``).
    force_hermitian
        Use the symmetric eigensolver.
    regularization
        λ added to every kept eigenvalue.
    seed
        Seed of the start vector.
    hvp_batch_size
        Samples per chunk of the Hessian-vector-product passes.
    """

    def __init__(self, subspace_dim: Optional[int] = None, k_largest_eig_vals: Optional[int] = None,
                 force_hermitian: bool = True, regularization: float = 0.0, seed: Optional[int] = None,
                 hvp_batch_size: Optional[int] = None):
        self.subspace_dim = subspace_dim
        self.k_largest_eig_vals = k_largest_eig_vals
        self.force_hermitian = force_hermitian
        self.regularization = regularization
        self.seed = seed
        self.hvp_batch_size = hvp_batch_size

    def build(self, model_influence: InfluenceModel, dataset: tf.data.Dataset) -> InverseHessianVectorProduct:
        return ArnoldiIHVP(model_influence, dataset, self.subspace_dim, self.k_largest_eig_vals, self.force_hermitian,
                           regularization=self.regularization, seed=self.seed, hvp_batch_size=self.hvp_batch_size)
