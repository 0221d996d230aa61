"""Metrics shared by every stage's evaluation and by the baselines."""

from .image import HEAD_THRESHOLD, METRIC_NAMES, paper_psnr, pool_rows, slice_metrics, summarize

__all__ = ["HEAD_THRESHOLD", "METRIC_NAMES", "paper_psnr", "pool_rows", "slice_metrics", "summarize"]
