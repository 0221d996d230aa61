"""Shared image metrics: agree with MONAI, head-only SSIM ignores background, paper PSNR."""

import math

import torch
from monai.metrics import PSNRMetric, SSIMMetric

from monai_mrngan.metrics import METRIC_NAMES, paper_psnr, pool_rows, slice_metrics, summarize


def test_matches_monai_metrics():
    torch.manual_seed(0)
    target = torch.rand(3, 1, 48, 48)
    pred = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    m = slice_metrics(pred, target)
    assert torch.allclose(m["ssim"], SSIMMetric(spatial_dims=2, data_range=1.0)(pred, target).flatten(), atol=1e-5)
    assert torch.allclose(m["psnr"], PSNRMetric(max_val=1.0)(pred, target).flatten(), atol=1e-4)


def test_head_only_ssim_ignores_background():
    target = torch.zeros(1, 1, 64, 64)
    target[..., 16:48, 16:48] = torch.rand(32, 32) * 0.8 + 0.2
    black = torch.zeros_like(target)
    m = slice_metrics(black, target)
    assert m["ssim"].item() > 0.4  # background alone makes an all-black guess look decent
    assert m["ssim_head"].item() < 0.05  # but not where the head is
    assert slice_metrics(target, target)["ssim_head"].item() > 0.999


def test_empty_target_gives_nan_head_ssim_and_summary_skips_it():
    m = slice_metrics(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))
    assert torch.isnan(m["ssim_head"]).all()
    s = summarize({"a": torch.tensor([1.0, float("nan"), 3.0])})
    assert s["a"] == 2.0


def test_paper_psnr_convention():
    # the paper's 75.6 dB at MSE 2.17e-3 is 20 log10(255 / sqrt(MSE)) on [0, 1] data (about 74.8)
    assert abs(paper_psnr(2.17e-3) - 74.8) < 0.1
    assert abs(paper_psnr(0.01) - (20 * math.log10(255) + 20)) < 1e-9


def test_pooled_rows_join_every_slice_and_no_rows_give_empty_metrics():
    a = slice_metrics(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    b = slice_metrics(torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16))
    pooled = pool_rows([a, b])
    assert set(pooled) == set(METRIC_NAMES) and all(v.shape == (5,) for v in pooled.values())
    torch.testing.assert_close(pooled["psnr"], torch.cat([a["psnr"], b["psnr"]]))
    assert all(v.numel() == 0 for v in pool_rows([]).values()) and set(pool_rows([])) == set(METRIC_NAMES)

