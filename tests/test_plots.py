"""Figures: the legend of codes.png stays clear of the points."""

import numpy as np
import pytest

from fastae import plots


@pytest.fixture
def kept(monkeypatch):
    """The figures that would be saved, kept open for inspection."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    yield figures
    for fig in figures:
        plots.plt.close(fig)


def test_codes_legend_is_outside_the_axes(kept):
    rng = np.random.default_rng(0)
    plots.codes_2d("unused.png", rng.random((200, 8)), rng.integers(0, 10, 200))
    (fig,) = kept
    fig.canvas.draw()
    (ax,) = [ax for ax in fig.axes]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 > ax.get_window_extent().x1
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [str(i) for i in range(10)]


def test_many_classes_get_a_colorbar_instead_of_a_legend(kept):
    rng = np.random.default_rng(0)
    plots.codes_2d("unused.png", rng.random((200, 2)), rng.integers(0, 50, 200))
    (fig,) = kept
    scatter_axes, colorbar_axes = fig.axes
    assert scatter_axes.get_legend() is None
    assert colorbar_axes.get_ylabel() == "label"
