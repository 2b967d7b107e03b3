"""Figures that more than one stage draws, so the stages share them through the floor instead of
importing each other: the calibration (coverage) figure of the train stage's MLflow run and of the
report page."""

from __future__ import annotations

from typing import Mapping, Sequence


def coverage_figure(curves: Mapping[str, Sequence[float]], ylabel: str, figsize: tuple[float, float] = (4.5, 4)):
    """One line per label: the observed share of stars within the predicted interval against the
    interval's nominal coverage (``stellar.ensemble.COVERAGE_LEVELS``), with the diagonal a calibrated
    model follows. Returns the matplotlib figure (Agg backend), laid out and ready to save."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stellar.ensemble import COVERAGE_LEVELS

    fig, ax = plt.subplots(figsize=figsize)
    for label, cover in curves.items():
        ax.plot(COVERAGE_LEVELS, cover, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("expected coverage")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
