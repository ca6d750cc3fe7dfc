"""Plots: grids of influential images and data-centric explanations, and benchmark curves."""
from .benchmark import BenchmarkDisplay
from .image import normalize_image, plot_datacentric_explanations, plot_most_influential_images

__all__ = ["BenchmarkDisplay", "normalize_image", "plot_datacentric_explanations", "plot_most_influential_images"]
