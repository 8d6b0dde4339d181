"""measure/plots.py: a plot path is checked before any work (an image format matplotlib writes, an
existing folder), and a figure is written whole or not at all."""

from __future__ import annotations

import pytest

from inrank_convert.core.errors import UsageError
from inrank_convert.measure.analysis import LayerSpectrum, SpectrumResult
from inrank_convert.measure.plots import check_plot_path, plot_spectrum, pyplot, save_figure

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_plot_path_is_checked_before_any_work(tmp_path):
    for name in ("spectra.png", "spectra.PDF", "spectra.svg"):
        check_plot_path(tmp_path / name)
    for name, says in (("spectra.safetensors", "'.safetensors' is not an image format"),
                       ("spectra", "'no extension' is not an image format")):
        with pytest.raises(UsageError, match=says):
            check_plot_path(tmp_path / name)
    with pytest.raises(UsageError, match="the plot's folder does not exist"):
        check_plot_path(tmp_path / "missing" / "spectra.png")
    assert list(tmp_path.iterdir()) == []  # checking writes nothing


def test_a_spectrum_plot_is_a_png_and_nothing_else_is_left(tmp_path):
    result = SpectrumResult("ckpt", "reference", "energy", [0.5, 0.9], [
        LayerSpectrum("a.weight", (8, 6), 14.0, [3.0, 2.0, 1.0], {0.5: 1, 0.9: 2}),
        LayerSpectrum("b.weight", (4, 4), 0.0, [], {0.5: 0, 0.9: 0}),  # an unchanged layer: no spectrum line
    ])
    path = plot_spectrum(result, tmp_path / "spectra.png")
    assert path == tmp_path / "spectra.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["spectra.png"]


def test_an_unwritable_plot_is_one_user_error_and_leaves_nothing(tmp_path):
    figure = pyplot().figure()
    target = tmp_path / "plot.png"
    target.mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(UsageError, match="cannot write the plot"):
        save_figure(figure, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"] and not any(target.iterdir())
