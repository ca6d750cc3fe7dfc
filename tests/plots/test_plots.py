"""Plots with the Agg backend: files written, axes counts, titles, benchmark save/load round trip."""
import matplotlib

matplotlib.use("Agg")

# pylint: disable=wrong-import-position
import matplotlib.pyplot as plt
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.plots import (BenchmarkDisplay, normalize_image, plot_datacentric_explanations,
                                    plot_most_influential_images)


def images(k: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-3, 5, size=(k, *shape)).astype(np.float32)


def grid_rows(figure) -> int:
    """Number of distinct rows of axes (by their vertical position)."""
    return len({round(ax.get_position().y0, 6) for ax in figure.axes})


@pytest.mark.parametrize("shape", [(6, 8), (6, 8, 1), (6, 8, 3)])
def test_normalize_image(shape):
    image = images(1, shape)[0]
    normalised, cmap = normalize_image(image)
    assert normalised.min() == 0.0 and normalised.max() == 1.0
    assert normalised.shape == shape[:2] + ((3,) if len(shape) == 3 and shape[2] == 3 else ())
    assert cmap == ("gray" if len(shape) == 2 or shape[2] == 1 else None)
    constant, _ = normalize_image(np.full(shape, 7.0))
    assert np.all(constant == 0.0)
    with pytest.raises(ValueError):
        normalize_image(np.zeros((4, 4, 2)))


@pytest.mark.parametrize("shape", [(6, 8), (6, 8, 1), (6, 8, 3)])
def test_most_influential_images(shape, tmp_path):
    values = np.array([3.14159, -1.0, 0.5, 2.0, 7.777, 0.0, 1.234])
    figure = plot_most_influential_images((tf.constant(images(7, shape)), tf.constant(values)), cols=5)
    assert len(figure.axes) == 7
    assert grid_rows(figure) == 2
    assert [ax.get_title() for ax in figure.axes] == [f"inf_value = {v:.2f}" for v in values]
    assert figure.axes[0].get_title() == "inf_value = 3.14"
    plt.close(figure)
    path = tmp_path / "most.png"
    assert plot_most_influential_images((images(3, shape), values[:3]), cols=2, save_path=str(path)) is None
    assert path.stat().st_size > 0
    assert not plt.get_fignums()


def test_datacentric_explanations_rows(tmp_path):
    values = np.arange(7) / 3
    figure = plot_datacentric_explanations(images(1, (5, 5, 3))[0], (images(7, (5, 5, 3)), values), cols=5)
    assert len(figure.axes) == 8
    assert grid_rows(figure) == 1 + 2
    assert figure.axes[0].get_title() == "explained image"
    assert [ax.get_title() for ax in figure.axes[1:]] == [f"inf_value = {v:.2f}" for v in values]
    assert figure.get_size_inches()[1] > 3 * 2.0
    plt.close(figure)
    path = tmp_path / "explanations.png"
    plot_datacentric_explanations(np.zeros((5, 5)), (images(2, (5, 5)), values[:2]), save_path=str(path))
    assert path.stat().st_size > 0
    with pytest.raises(ValueError):
        plot_datacentric_explanations(np.zeros((5, 5)), (images(2, (5, 5)), values[:3]))


def bench_result():
    rng = np.random.default_rng(0)
    curves_a = np.sort(rng.uniform(size=(3, 10)), axis=1)
    curves_a[1, 0] = np.nan  # a failed evaluation: skipped in the plot
    curves_b = np.sort(rng.uniform(size=(2, 8)), axis=1)
    return {"first_order": (curves_a, np.nanmean(curves_a, axis=0), 0.61),
            "tracin": (curves_b, curves_b.mean(axis=0), np.array([0.5, 0.7]))}


def test_bench_save_load_round_trip(tmp_path):
    result = bench_result()
    written = BenchmarkDisplay.save_bench_result(result, str(tmp_path / "bench"))
    assert written.endswith(".npz")
    for loaded in (BenchmarkDisplay.load_bench_result(written), BenchmarkDisplay.load_bench_result(str(tmp_path))):
        assert list(loaded) == list(result)
        for name, (curves, mean_curve, roc) in result.items():
            np.testing.assert_array_equal(loaded[name][0], curves)
            np.testing.assert_array_equal(loaded[name][1], mean_curve)
            np.testing.assert_array_equal(loaded[name][2], roc)
    assert isinstance(BenchmarkDisplay.load_bench_result(written)["first_order"][2], float)
    with pytest.raises(FileNotFoundError):
        BenchmarkDisplay.load_bench_result(str(tmp_path / "missing.npz"))


def test_plot_bench(tmp_path):
    result = bench_result()
    figure = BenchmarkDisplay.plot_bench(result, title="CIFAR-10")
    assert len(figure.axes) == 2
    mean_a = np.nanmean(result["first_order"][1])
    assert figure.axes[0].get_title() == f"Mislabeled detection first_order \n ROC={mean_a:.4f} \n Nbr of run=2"
    assert "Nbr of run=2" in figure.axes[1].get_title()
    assert len(figure.axes[0].lines) == 2 + 2  # two valid runs, the mean, the diagonal
    assert figure.get_suptitle() == "CIFAR-10"
    plt.close(figure)
    saved = BenchmarkDisplay.save_bench_result(result, str(tmp_path / "bench.npz"))
    png = tmp_path / "bench.png"
    assert BenchmarkDisplay.plot_bench_from_path(saved, str(png)) is None
    with open(png, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()
