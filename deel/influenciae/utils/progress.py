"""Progress bars over passes on data, and the library's logger.

``verbose=None`` (the default of every calculator) shows a bar only in interactive sessions: a terminal on
standard error, or a notebook; never under ``CI`` or pytest. ``True``/``False`` force it on or off. The bar is
Keras' ``Progbar`` (ETA included). Iterative solvers log through the ``deel.influenciae`` logger.
"""
import logging
import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

import keras

LOGGER = logging.getLogger("deel.influenciae")
Item = TypeVar("Item")


def interactive() -> bool:
    """Whether progress should be shown by default: a notebook or a terminal, outside CI and pytest."""
    if os.environ.get("CI") or "pytest" in sys.modules:
        return False
    if "ipykernel" in sys.modules:
        return True
    stream = getattr(sys, "stderr", None)
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def resolve_verbose(verbose: Optional[bool]) -> bool:
    """``verbose`` itself, or :func:`interactive` when it is None."""
    return interactive() if verbose is None else bool(verbose)


def progress_bar(items: Iterable[Item], total: Optional[int], description: str,
                 verbose: Optional[bool] = None) -> Iterator[Item]:
    """Yield ``items``, showing a bar with ETA (``total`` steps, unknown when None) while ``verbose`` resolves
    to True."""
    if not resolve_verbose(verbose):
        yield from items
        return
    progbar = keras.utils.Progbar(total, unit_name="batch")
    LOGGER.info("%s: %s batches", description, "?" if total is None else total)
    print(description, flush=True)
    step = 0
    for item in items:
        yield item
        step += 1
        progbar.update(step)
    if total is None or step != total:
        progbar.update(step, finalize=True)
