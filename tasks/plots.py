"""The reports' matplotlib figures, set up in one place: the Agg backend (no display), the
occlusion-accuracy axes both reports draw, and PNG bytes without a version stamp (same bytes per run)."""
from __future__ import annotations

import io
from pathlib import Path

from tasks import atomic


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_accuracy_axes(ax, xlabel: str, ylabel: str, chance_label: str) -> None:
    """Axes of an accuracy in [0, 1] with the 0.5 line (chance), after the curves are drawn."""
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label=chance_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)


def figure_png(fig) -> bytes:
    """Lay out ``fig``, close it, and return its PNG bytes (no version stamp)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def save_png(fig, path: str | Path) -> Path:
    """Lay out, write ``fig`` to ``path`` atomically and close it."""
    return atomic.write_bytes(path, figure_png(fig))
