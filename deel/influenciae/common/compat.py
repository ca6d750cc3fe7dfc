"""Compatibility with earlier names and call forms, in one place; each use warns with a ``DeprecationWarning``.

The library has one name per concept (``train_set`` for training data, ``n_opt_iters`` for a solver's iterations,
``order`` for the ranking direction, ...). Names of the reference (Influenciae 0.3) and of earlier versions that
differ keep working through the shims below, which say what to write instead.
"""
import functools
import warnings
from typing import Any, Callable, Optional, Tuple, TypeVar

Function = TypeVar("Function", bound=Callable[..., Any])


def deprecated(message: str, stacklevel: int = 3) -> None:
    """Warn that a deprecated form was used (``DeprecationWarning``)."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def renamed_arguments(**old_to_new: str) -> Callable[[Function], Function]:
    """Decorator: keyword arguments passed under an old name are passed under the new one, with a
    ``DeprecationWarning``.

    Raises
    ------
    TypeError
        When both the old and the new name are given.
    """
    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{function.__qualname__}() got both {old!r} (deprecated) and {new!r}; "
                                        f"pass {new!r} only.")
                    deprecated(f"{function.__qualname__}(): the argument {old!r} is now called {new!r}.")
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def order_given_as_nearest_neighbors(nearest_neighbors: Any, order: Any, order_class: type) -> Tuple[Any, Any]:
    """``top_k(test, train, k, ORDER.X)``: the reference's README passes the order fourth, where
    ``nearest_neighbors`` now stands. Returns ``(nearest_neighbors, order)`` with the order moved."""
    if isinstance(nearest_neighbors, order_class):
        deprecated("top_k(): pass the order as order=ORDER...; given fourth, it takes the place of nearest_neighbors.",
                   stacklevel=4)
        return None, nearest_neighbors
    return nearest_neighbors, order


def loss_given_as_last_layer(last_layer: Any, loss_function: Any,
                             is_loss: Callable[[Any], bool]) -> Tuple[Optional[Any], Any]:
    """``InfluenceModel(model, start_layer, loss)``: a loss passed third, where ``last_layer`` now stands.
    Returns ``(last_layer, loss_function)`` with the loss moved."""
    if last_layer is not None and is_loss(last_layer):
        deprecated("InfluenceModel(): pass the loss as loss_function=...; given third, it takes the place of "
                   "last_layer.", stacklevel=4)
        return None, last_layer
    return last_layer, loss_function
