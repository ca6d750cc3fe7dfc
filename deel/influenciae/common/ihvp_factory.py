"""Factories that build an IHVP solver once the model and the hessian dataset are known.

Each factory holds a solver configuration (:mod:`.solver_registry`) and builds the solver from it; they keep the
reference's constructors.
"""
from typing import Optional, Union

import keras
import tensorflow as tf

from .arnoldi_ihvp import ArnoldiConfig
from .compat import renamed_arguments
from .exact_ihvp import ExactConfig
from .ihvp_base import InverseHessianVectorProduct
from .iterative_ihvp import ConjugateGradientConfig, LissaConfig
from .model_wrappers import InfluenceModel
from .solver_registry import SolverConfig


class InverseHessianVectorProductFactory:
    """Builds an :class:`InverseHessianVectorProduct` for a model and a dataset from a solver configuration.

    Parameters
    ----------
    config
        The solver's configuration (e.g. ``ExactConfig(regularization=1e-3)``).
    """

    def __init__(self, config: SolverConfig):
        if not isinstance(config, SolverConfig):
            raise TypeError(f"config must be a SolverConfig, got {config!r}.")
        self.config = config

    def build(self, model_influence: InfluenceModel, dataset: tf.data.Dataset) -> InverseHessianVectorProduct:
        """Return a fitted solver for ``model_influence`` whose Hessian is the mean over ``dataset``."""
        return self.config.build(model_influence, dataset)

    def __getattr__(self, name: str):
        # The configuration's fields read as the factory's attributes (factory.regularization, ...).
        config = self.__dict__.get("config")
        if config is not None and name in getattr(type(config), "__dataclass_fields__", {}):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class ExactIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`ExactIHVP` solvers (``regularization`` = λ of ``H + λI``)."""

    def __init__(self, regularization: float = 0.0):
        super().__init__(ExactConfig(regularization=regularization))


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
    n_opt_iters
        CG iterations (``n_cgd_iters``, the reference's name, is accepted with a ``DeprecationWarning``).
    extractor_layer
        See ``feature_extractor``.
    regularization
        λ of ``H + λI``.
    """

    @renamed_arguments(n_cgd_iters="n_opt_iters")
    def __init__(self, feature_extractor: Union[int, str, keras.Model] = -1, n_opt_iters: int = 100,
                 extractor_layer: Optional[Union[int, str]] = None, regularization: float = 0.0):
        extractor_layer, feature_extractor = _extractor_settings(feature_extractor, extractor_layer)
        super().__init__(ConjugateGradientConfig(regularization=regularization, n_opt_iters=n_opt_iters,
                                                 extractor_layer=extractor_layer,
                                                 feature_extractor=feature_extractor))

    @property
    def n_cgd_iters(self) -> int:
        """The reference's name of ``n_opt_iters``."""
        return self.config.n_opt_iters


class LissaIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`LissaIHVP` solvers (arguments as :class:`CGDIHVPFactory`, plus ``damping`` and ``scale``)."""

    @renamed_arguments(n_cgd_iters="n_opt_iters")
    def __init__(self, feature_extractor: Union[int, str, keras.Model] = -1, n_opt_iters: int = 100,
                 extractor_layer: Optional[Union[int, str]] = None, damping: float = 1e-4, scale: float = 10.,
                 regularization: float = 0.0):
        extractor_layer, feature_extractor = _extractor_settings(feature_extractor, extractor_layer)
        super().__init__(LissaConfig(regularization=regularization, n_opt_iters=n_opt_iters, damping=damping,
                                     scale=scale, extractor_layer=extractor_layer,
                                     feature_extractor=feature_extractor))

    @property
    def n_cgd_iters(self) -> int:
        """The earlier name of ``n_opt_iters``."""
        return self.config.n_opt_iters


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
        Seed of the start vector (default 0; ``None``: TensorFlow's global random state).
    hvp_batch_size
        Samples per chunk of the Hessian-vector-product passes.
    """

    def __init__(self, subspace_dim: Optional[int] = None, k_largest_eig_vals: Optional[int] = None,
                 force_hermitian: bool = True, regularization: float = 0.0, seed: Optional[int] = 0,
                 hvp_batch_size: Optional[int] = None):
        super().__init__(ArnoldiConfig(regularization=regularization, subspace_dim=subspace_dim,
                                       k_largest_eig_vals=k_largest_eig_vals, force_hermitian=force_hermitian,
                                       seed=seed, hvp_batch_size=hvp_batch_size))
