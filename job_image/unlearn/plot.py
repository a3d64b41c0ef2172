"""Before/after histograms of max-softmax confidence, forget vs held-out.

Uses matplotlib's object API with the Agg canvas, so no display and no pyplot
global state are involved (safe in a pod and in tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unlearn.audit import max_softmax
from unlearn.files import atomic_write


def plot_confidence(logits: dict[str, npt.NDArray[np.float32]], dest: Path, title: str = "") -> None:
    """Two panels (before, after); each overlays forget and held-out confidence histograms."""
    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no display, no global pyplot state
    axes = fig.subplots(1, 2, sharey=True)
    bins = np.linspace(0.0, 1.0, 26)
    for ax, tag, label in ((axes[0], "pre", "before"), (axes[1], "post", "after")):
        for part, colour in (("forget", "tab:red"), ("heldout", "tab:blue")):
            key = f"{tag}_{part}"
            if key in logits:
                ax.hist(max_softmax(logits[key]), bins=bins, density=True, alpha=0.55, color=colour, label=part)
        ax.set_title(f"{label} unlearning")
        ax.set_xlabel("max softmax confidence")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("density")
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            fig.savefig(handle, format="png", dpi=110)

    atomic_write(dest, write)
