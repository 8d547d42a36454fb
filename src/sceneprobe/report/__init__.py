"""The comparison report: heatmaps, best-site curves, prediction grids, summary.md and a self-contained report.html."""
from .html import write_report

__all__ = ["write_report"]
