"""influenciae: which training samples made a TensorFlow / Keras model do what it does.

Sub-packages: ``common`` (influence models, inverse-Hessian-vector products, base calculators),
``influence`` (influence functions), ``utils`` (helpers).
"""
from . import common, influence, utils
from .utils.sorted_dict import ORDER
from .version import __version__

__all__ = ["common", "influence", "utils", "ORDER", "__version__"]
