"""Image grids of influential training samples and of data-centric explanations.

Images may be grayscale (H, W) or (H, W, 1), or colour (H, W, 3) / (H, W, 4); each one is min-max normalised to
[0, 1] on its own for display (a constant image is shown black). Every function returns the matplotlib
``Figure`` when ``save_path`` is None, and otherwise writes the file and closes the figure.
"""
import math
from typing import Any, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

_SPACING = 0.3  # inches between images and around the grid
_TITLE_ROOM = 0.3  # inches above each image for its title


def normalize_image(image: Any) -> Tuple[np.ndarray, Optional[str]]:
    """Min-max normalise one image to [0, 1] for display.

    Parameters
    ----------
    image
        Array-like of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); a leading batch axis of size 1 is dropped.

    Returns
    -------
    image, cmap
        The normalised image, (H, W) for grayscale or (H, W, C) for colour, in float64, and the colour map to
        show it with (``"gray"`` for grayscale, ``None`` for colour).

    Raises
    ------
    ValueError
        If the shape is not one of the above.
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}.")
    low, high = np.nanmin(array), np.nanmax(array)
    span = high - low
    normalised = (array - low) / span if span > 0 else np.zeros_like(array)
    return normalised, ("gray" if normalised.ndim == 2 else None)


def _split_images_and_values(pairs: Any, what: str) -> Tuple[Sequence[Any], np.ndarray]:
    try:
        images, values = pairs
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be a pair (images (k, H, W[, C]), values (k,)).") from error
    images = [np.asarray(image) for image in images]
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(images) != len(values):
        raise ValueError(f"{what}: {len(images)} images but {len(values)} values.")
    return images, values


def _grid_figure(nb_rows: int, cols: int, img_size: float, aspect: float) -> Tuple[Figure, float, float]:
    """A figure sized for ``nb_rows`` x ``cols`` images of width ``img_size`` inches and height/width ``aspect``."""
    width = cols * img_size + (cols - 1) * _SPACING + 2 * _SPACING
    cell_height = img_size * aspect + _TITLE_ROOM
    height = nb_rows * cell_height + (nb_rows - 1) * _SPACING + 2 * _SPACING
    return plt.figure(figsize=(width, height)), width, height


def _add_image(figure: Figure, position: Tuple[int, int], sizes: Tuple[float, float, float, float],
               image: Any, title: str):
    """Place one image at (row, col) of the grid; ``sizes`` = (fig width, fig height, img size, aspect)."""
    row, col = position
    width, height, img_size, aspect = sizes
    image_height = img_size * aspect
    left = _SPACING + col * (img_size + _SPACING)
    top = _SPACING + row * (image_height + _TITLE_ROOM + _SPACING) + _TITLE_ROOM
    axes = figure.add_axes((left / width, 1 - (top + image_height) / height, img_size / width, image_height / height))
    normalised, cmap = normalize_image(image)
    axes.imshow(normalised, cmap=cmap, vmin=0.0, vmax=1.0)
    axes.set_title(title)
    axes.axis("off")
    return axes


def _aspect(images: Sequence[Any]) -> float:
    shape = normalize_image(images[0])[0].shape
    return shape[0] / shape[1]


def _finish(figure: Figure, save_path: Optional[str]) -> Optional[Figure]:
    if save_path is None:
        return figure
    figure.savefig(save_path)
    plt.close(figure)
    return None


def _check_layout(cols: int, img_size: float) -> None:
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1:
        raise ValueError(f"cols must be an integer >= 1, got {cols!r}.")
    if not img_size > 0:
        raise ValueError(f"img_size must be > 0, got {img_size!r}.")


def plot_most_influential_images(influential_images: Any, cols: int = 5, img_size: float = 2.,
                                 save_path: Optional[str] = None) -> Optional[Figure]:
    """Grid of the k most influential training images with their influence values.

    Parameters
    ----------
    influential_images
        Pair ``(images (k, H, W[, C]), values (k,))``, e.g. the output of
        ``compute_top_k_from_training_dataset``.
    cols
        Images per row; the grid has ``ceil(k / cols)`` rows.
    img_size
        Width of each image in inches (the height follows the images' aspect ratio).
    save_path
        Where to save the figure; if None it is returned instead.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure (k axes, titled ``inf_value = {value:.2f}``) when ``save_path`` is None.
    """
    _check_layout(cols, img_size)
    images, values = _split_images_and_values(influential_images, "influential_images")
    if not images:
        raise ValueError("influential_images holds no image.")
    aspect = _aspect(images)
    figure, width, height = _grid_figure(math.ceil(len(images) / cols), cols, img_size, aspect)
    for index, (image, value) in enumerate(zip(images, values)):
        _add_image(figure, divmod(index, cols), (width, height, img_size, aspect), image, f"inf_value = {value:.2f}")
    return _finish(figure, save_path)


def plot_datacentric_explanations(image: Any, explanations: Any, cols: int = 5, img_size: float = 2.,
                                  save_path: Optional[str] = None) -> Optional[Figure]:
    """An explained image on the first row, then its k explaining training images with their values.

    Parameters
    ----------
    image
        The explained image (H, W[, C]) (or (1, H, W[, C])).
    explanations
        Pair ``(images (k, H, W[, C]), values (k,))``, e.g. one test sample's row of ``top_k``.
    cols
        Explaining images per row; the figure has ``1 + ceil(k / cols)`` rows.
    img_size
        Width of each image in inches.
    save_path
        Where to save the figure; if None it is returned instead.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure (1 + k axes: ``"explained image"`` then ``inf_value = {value:.2f}``) when ``save_path`` is None.
    """
    _check_layout(cols, img_size)
    images, values = _split_images_and_values(explanations, "explanations")
    aspect = _aspect([image])
    figure, width, height = _grid_figure(1 + math.ceil(len(images) / cols), cols, img_size, aspect)
    sizes = (width, height, img_size, aspect)
    _add_image(figure, (0, 0), sizes, image, "explained image")
    for index, (explaining, value) in enumerate(zip(images, values)):
        row, col = divmod(index, cols)
        _add_image(figure, (row + 1, col), sizes, explaining, f"inf_value = {value:.2f}")
    return _finish(figure, save_path)
