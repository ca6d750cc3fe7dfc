"""Curves of the mislabeled-sample detection benchmark, and the file format they are saved in.

A benchmark result maps a method name to ``(curves, mean_curve, roc)``:

* ``curves`` (E, N): for each of E evaluations, the fraction of the mislabeled samples found after searching
  the first 1, 2, ..., N samples of the ranking (an evaluation whose first value is NaN failed and is skipped);
* ``mean_curve`` (N,): their mean;
* ``roc``: a summary score (a float, or an array, e.g. one value per evaluation).

File format (written by :meth:`BenchmarkDisplay.save_bench_result`, read by
:meth:`BenchmarkDisplay.load_bench_result`): one NumPy ``.npz`` archive, readable without pickle, holding

* ``format_version``: 0-d int array, currently 1;
* ``names``: 1-d unicode array of the method names, in the order of the result;
* for the i-th method: ``curves_{i}`` (E, N), ``mean_curve_{i}`` (N,) and ``roc_{i}`` (0-d for a float).

``load_bench_result`` also accepts a directory: every ``*.npz`` in it (in name order) is read and merged.
"""
import math
import os
from typing import Dict, Optional, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

BenchResult = Dict[str, Tuple[np.ndarray, np.ndarray, Union[float, np.ndarray]]]

FORMAT_VERSION = 1


def _npz_path(path: str) -> str:
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


class BenchmarkDisplay:
    """Save, load and plot mislabeled-detection benchmark results (see the module docstring for the format)."""

    @staticmethod
    def save_bench_result(result: BenchResult, path: str) -> str:
        """Save a benchmark result to one ``.npz`` file.

        Parameters
        ----------
        result
            ``{name: (curves (E, N), mean_curve (N,), roc)}``.
        path
            Destination; ``.npz`` is appended when missing.

        Returns
        -------
        str
            The path written.
        """
        if not isinstance(result, dict) or not result:
            raise ValueError("result must be a non-empty dict {name: (curves, mean_curve, roc)}.")
        arrays = {"format_version": np.asarray(FORMAT_VERSION),
                  "names": np.asarray([str(name) for name in result], dtype=str)}
        for index, (name, entry) in enumerate(result.items()):
            try:
                curves, mean_curve, roc = entry
            except (TypeError, ValueError) as error:
                raise ValueError(f"result[{name!r}] must be a triple (curves, mean_curve, roc).") from error
            arrays[f"curves_{index}"] = np.asarray(curves, dtype=np.float64)
            arrays[f"mean_curve_{index}"] = np.asarray(mean_curve, dtype=np.float64)
            arrays[f"roc_{index}"] = np.asarray(roc, dtype=np.float64)
        path = _npz_path(path)
        np.savez(path, **arrays)
        return path

    @staticmethod
    def load_bench_result(path: str) -> BenchResult:
        """Load a result written by :meth:`save_bench_result` (or every such file of a directory, merged).

        Returns
        -------
        dict
            ``{name: (curves (E, N), mean_curve (N,), roc)}`` with ``roc`` a float when it was saved as one.

        Raises
        ------
        FileNotFoundError
            If nothing is found at ``path``.
        ValueError
            If a file is not in this format, or a method name appears twice in a directory.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".npz"))
            if not files:
                raise FileNotFoundError(f"No .npz benchmark result in {path!r}.")
            merged: BenchResult = {}
            for file in files:
                for name, entry in BenchmarkDisplay.load_bench_result(file).items():
                    if name in merged:
                        raise ValueError(f"Method {name!r} appears in several files of {path!r}.")
                    merged[name] = entry
            return merged
        file = path if os.path.exists(path) else _npz_path(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"No benchmark result at {path!r}.")
        with np.load(file, allow_pickle=False) as archive:
            if "names" not in archive or "format_version" not in archive:
                raise ValueError(f"{file!r} is not a benchmark result saved by BenchmarkDisplay.save_bench_result.")
            if int(archive["format_version"]) > FORMAT_VERSION:
                raise ValueError(f"{file!r} uses format version {int(archive['format_version'])}, newer than "
                                 f"this library's {FORMAT_VERSION}.")
            result: BenchResult = {}
            for index, name in enumerate(archive["names"]):
                roc = archive[f"roc_{index}"]
                result[str(name)] = (archive[f"curves_{index}"], archive[f"mean_curve_{index}"],
                                     float(roc) if roc.ndim == 0 else roc)
        return result

    @staticmethod
    def plot_bench_from_path(path: str, path_to_save: Optional[str] = None) -> Optional[Figure]:
        """Load a saved result (file or directory, see :meth:`load_bench_result`) and plot it with
        :meth:`plot_bench`."""
        return BenchmarkDisplay.plot_bench(BenchmarkDisplay.load_bench_result(path), path_to_save)

    @staticmethod
    def plot_bench(result: BenchResult, path_to_save: Optional[str] = None,
                   title: Optional[str] = None) -> Optional[Figure]:
        """One subplot per method: every evaluation's curve (faint), their mean and the random-search diagonal.

        Each subplot is titled ``"Mislabeled detection {name} \\n ROC={mean of mean_curve:.4f} \\n Nbr of
        run={number of valid evaluations}"``; the x axis is the part of the dataset searched ((i + 1) / N for
        the i-th point) and the y axis the part of the mislabeled samples found.

        Parameters
        ----------
        result
            ``{name: (curves (E, N), mean_curve (N,), roc)}``.
        path_to_save
            Where to save the figure; if None it is returned instead.
        title
            Optional title of the whole figure.

        Returns
        -------
        matplotlib.figure.Figure or None
            The figure when ``path_to_save`` is None (it is closed after saving otherwise).
        """
        if not result:
            raise ValueError("result holds no method.")
        cols = min(len(result), 4)
        rows = math.ceil(len(result) / cols)
        figure, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows + 0.5), squeeze=False)
        for ax, (name, (curves, mean_curve, _)) in zip(axes.ravel(), result.items()):
            curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
            mean_curve = np.asarray(mean_curve, dtype=np.float64).reshape(-1)
            x_axis = np.arange(1, mean_curve.size + 1) / mean_curve.size
            valid = [curve for curve in curves if curve.size and not np.isnan(curve[0])]
            for curve in valid:
                ax.plot(np.arange(1, curve.size + 1) / curve.size, curve, color="C0", alpha=0.25)
            ax.plot(x_axis, mean_curve, color="C0")
            ax.plot([0, 1], [0, 1], color="C1")
            ax.set_title(f"Mislabeled detection {name} \n ROC={np.nanmean(mean_curve):.4f} \n Nbr of run={len(valid)}")
            ax.set_xlabel("Part of the dataset searched")
            ax.set_ylabel("Part of mislabeled found")
            ax.grid(True)
        for ax in axes.ravel()[len(result):]:
            figure.delaxes(ax)
        if title is not None:
            figure.suptitle(title)
        figure.tight_layout()
        if path_to_save is None:
            return figure
        figure.savefig(path_to_save)
        plt.close(figure)
        return None
