"""influenciae: which training samples made a TensorFlow / Keras model do what it does.

Sub-packages: ``common`` (influence models, inverse-Hessian-vector products, base calculators),
``influence`` (influence functions), ``trac_in`` (TracIn), ``rps`` (representer points), ``utils`` (helpers).
"""
from . import common, influence, rps, trac_in, utils
from .utils.sorted_dict import ORDER
from .version import __version__

__all__ = ["common", "influence", "rps", "trac_in", "utils", "ORDER", "__version__"]
