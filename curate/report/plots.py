"""Figures for report.html: matplotlib (Agg) PNGs embedded as base64 <img> tags."""

from __future__ import annotations

import base64
import html
import io

KEPT_COLOR = "#55a868"
DROPPED_COLOR = "#c44e52"
POOL_COLOR = "#8da0cb"
READ_COLOR = "#4c72b0"


def figure(width: float, height: float, ncols: int = 1):
    """A new figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def png(fig, alt: str) -> str:
    """The figure as an <img> tag (PNG, base64), closed afterwards; `alt` names the plot."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
