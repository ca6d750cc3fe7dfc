"""influenciae: which training samples made a TensorFlow / Keras model do what it does.

Sub-packages: ``common`` (influence models, inverse-Hessian-vector products, base calculators),
``influence`` (influence functions: first order, second order, Arnoldi), ``trac_in`` (TracIn), ``trak`` (TRAK), ``rps``
(representer points), ``boundary_based`` (distance to the decision boundary; also ``boundary``), ``plots``
(image grids and benchmark curves), ``utils`` (helpers), ``benchmark`` (mislabeled-sample detection), ``evaluation``
(the linear datamodeling score and leave-one-out checks against retraining).
"""
from . import benchmark, boundary, boundary_based, common, evaluation, influence, plots, rps, trac_in, trak, utils
from .utils.sorted_dict import ORDER
from .version import __version__

__all__ = ["benchmark", "boundary", "boundary_based", "common", "evaluation", "influence", "plots", "rps", "trac_in",
           "trak", "utils", "ORDER", "__version__"]
