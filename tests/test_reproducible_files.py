"""Identical inputs give byte-identical figures (no dates, no random SVG ids)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from robustcaps.report.plots import save_figure


def _draw():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 0.1, 0.2], [0.9, 0.5, 0.1], marker="o", label="model")
    ax.fill_between([0, 0.1, 0.2], [0.8, 0.4, 0.0], [1.0, 0.6, 0.2], alpha=0.3)  # clip paths
    ax.legend()
    return fig


@pytest.mark.parametrize("ext", ["png", "svg"])
def test_same_figure_same_bytes(tmp_path, ext):
    blobs = []
    for i in range(2):
        fig = _draw()
        blobs.append(save_figure(fig, tmp_path / f"f{i}.{ext}").read_bytes())
        plt.close(fig)
    assert len(blobs[0]) > 1000
    assert blobs[0] == blobs[1]
    if ext == "svg":
        assert b"<dc:date>" not in blobs[0]
