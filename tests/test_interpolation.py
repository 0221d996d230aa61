"""The few-slice baselines that learn nothing (issue 13): monotone cubic (PCHIP) and registration-based
interpolation along the axial axis, the registration shared between calls, and both as methods of
``reconstruct`` and ``complete``."""

from __future__ import annotations

import numpy as np
import torch

from monai_mrngan.inference.reconstruct import reconstruct_volume
from monai_mrngan.inference.runners import is_gap_aware, make_runner
from monai_mrngan.inference.volume import cubic_fill, linear_fill, registration_fill


# ------------------------------------------------------------------ cubic baseline
def _z_volume(values: np.ndarray, size: int = 4) -> torch.Tensor:
    """(D,H,W) volume whose slice z is the constant ``values[z]`` times a fixed in-plane pattern."""
    pattern = torch.linspace(0.5, 1.0, size * size).view(size, size)
    return torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1) * pattern


def test_cubic_fill_is_linear_on_linear_data_close_on_cubic_data_and_never_overshoots():
    z = np.arange(21, dtype=np.float64) / 20
    linear = _z_volume(0.2 + 0.6 * z)
    given = [2, 6, 10, 14, 18]
    out = cubic_fill(linear[given], given, 21)
    torch.testing.assert_close(out, linear_fill(linear[given], given, 21), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0], linear[2])  # nearest copy beyond the outermost given slices

    cubic = _z_volume(0.1 + 0.3 * z + 0.8 * z**2 - 0.5 * z**3)  # smooth, in [0, 1]
    for given in ([0, 4, 8, 12, 16, 20], [0, 3, 7, 12, 16, 20]):  # regular and irregular spacing
        out = cubic_fill(cubic[given], given, 21)
        torch.testing.assert_close(out[given], cubic[given], atol=0, rtol=0)
        err_cubic = float((out - cubic).abs().max())
        err_linear = float((linear_fill(cubic[given], given, 21) - cubic).abs().max())
        assert err_cubic < 0.5 * err_linear, (err_cubic, err_linear)  # closer than linear on smooth data
    two = cubic_fill(cubic[[4, 12]], [12, 4], 21)  # two slices, given out of order: the straight line
    torch.testing.assert_close(two, linear_fill(cubic[[4, 12]], [12, 4], 21), atol=1e-6, rtol=0)

    step = _z_volume(np.where(z < 0.5, 0.1, 0.9))  # a tissue edge: monotone, no ringing
    given = [0, 4, 8, 12, 16, 20]
    out = cubic_fill(step[given], given, 21)
    assert float(out.min()) >= float(step.min()) - 1e-6 and float(out.max()) <= float(step.max()) + 1e-6
    assert bool(torch.all(torch.diff(out[:, 2, 2]) >= -1e-6))


def test_cubic_is_a_method_of_reconstruct():
    z = np.arange(17, dtype=np.float64) / 16
    vol = _z_volume(0.1 + 0.5 * z**2)
    given = [0, 4, 8, 12, 16]
    grid = 1.0 - z * 0.5
    rec = reconstruct_volume(vol[given], grid[given].tolist(), method="cubic", input_indices=given, num_slices=17, step_p=-0.5 / 16)
    np.testing.assert_allclose(np.moveaxis(rec.volume, 2, 0), cubic_fill(vol[given], given, 17).numpy(), atol=1e-6)
    assert not np.allclose(np.moveaxis(rec.volume, 2, 0), linear_fill(vol[given], given, 17).numpy(), atol=1e-4)
    assert rec.method == "cubic" and not is_gap_aware(make_runner("cubic"))


# ------------------------------------------------------------------ registration baseline
def _moving_disc(centres: list[float], size: int = 32, radius: float = 5.0) -> torch.Tensor:
    """(D,H,W): a bright disc whose centre moves along x from slice to slice (a structure that shifts with depth)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return torch.stack([0.8 * ((xx - c) ** 2 + (yy - size / 2) ** 2 < radius**2).float() for c in centres])


def test_registration_fill_moves_a_shifting_structure_where_linear_shows_it_twice():
    truth = _moving_disc([10 + 1.5 * z for z in range(9)])  # 6 px between given slices 4 apart
    given = [0, 4, 8]
    reg, lin = registration_fill(truth[given], given, 9), linear_fill(truth[given], given, 9)
    torch.testing.assert_close(reg[given], truth[given], atol=0, rtol=0)  # exact on the given slices
    err_reg, err_lin = float(((reg - truth) ** 2).mean()), float(((lin - truth) ** 2).mean())
    assert err_reg < 0.3 * err_lin, (err_reg, err_lin)
    mid = reg[2]  # halfway: one disc at the halfway place, not two half-bright ones
    assert float(mid[16, 13]) > 0.6 and float(mid[16, 7]) < 0.2 and float(mid[16, 19]) < 0.2
    # out of order, irregular gaps, a gap of one slice (nothing to fill) and nearest copy beyond the ends
    given = [7, 2, 3]
    out = registration_fill(truth[given], given, 9)
    torch.testing.assert_close(out[[2, 3, 7]], truth[[2, 3, 7]], atol=0, rtol=0)
    torch.testing.assert_close(out[0], truth[2])
    torch.testing.assert_close(out[8], truth[7])
    assert float(((out[4:7] - truth[4:7]) ** 2).mean()) < float(((linear_fill(truth[given], given, 9)[4:7] - truth[4:7]) ** 2).mean())
    torch.testing.assert_close(registration_fill(truth[[3, 4]], [3, 4], 9), linear_fill(truth[[3, 4]], [3, 4], 9))  # no gap


def test_registration_is_a_method_of_reconstruct():
    vol = _moving_disc([10 + 1.5 * z for z in range(9)])
    given = [0, 4, 8]
    grid = np.linspace(0.6, 0.4, 9)
    rec = reconstruct_volume(vol[given], grid[given].tolist(), method="registration", input_indices=given, num_slices=9, step_p=-0.025)
    np.testing.assert_allclose(np.moveaxis(rec.volume, 2, 0), registration_fill(vol[given], given, 9).numpy(), atol=1e-6)
    assert rec.method == "registration" and not is_gap_aware(make_runner("registration"))


def test_interpolate_between_registers_a_pair_given_both_ways_once(monkeypatch):
    """A gap filled from both ends hands (a, b) and (b, a) over in one batch: one registration each way, the same slices."""
    from monai_mrngan.atlas import registration

    truth = _moving_disc([10 + 1.5 * z for z in range(5)])
    a, b = truth[[0, 1]][:, None], truth[[4, 3]][:, None]
    fr = torch.tensor([[0.25, 0.5], [0.3, 0.6]])
    one_way = registration.interpolate_between(a, b, fr)
    sizes, register = [], registration.register_slices
    monkeypatch.setattr(registration, "register_slices", lambda m, f, cfg: sizes.append(len(m)) or register(m, f, cfg))
    both = registration.interpolate_between(torch.cat([a, b]), torch.cat([b, a]), torch.cat([fr, 1 - fr]))
    assert sizes == [2, 2]  # two distinct pairs, each registered a -> b and b -> a
    torch.testing.assert_close(both[:2], one_way, atol=1e-6, rtol=0)
    torch.testing.assert_close(both[2:], one_way, atol=1e-6, rtol=0)
    assert registration.interpolate_between(a[:0], b[:0], fr[:0]).shape == (0, 2, 1, *a.shape[-2:])


def test_shared_registrations_register_a_pair_once_across_calls(monkeypatch):
    """Inside the block a pair registered by one call (either way round) is read by the next; a new pair or another
    setting is registered; after the block nothing is kept. The slices are those of a call on its own."""
    from monai_mrngan.atlas import registration

    truth = _moving_disc([10 + 1.5 * z for z in range(5)])
    a, b, c = truth[[0]][:, None], truth[[4]][:, None], truth[[2]][:, None]
    fr = torch.tensor([[0.25, 0.5, 0.75]])
    alone, alone_ac = registration.interpolate_between(a, b, fr), registration.interpolate_between(a, c, fr)
    sizes, register = [], registration.register_slices
    monkeypatch.setattr(registration, "register_slices", lambda m, f, cfg: sizes.append(len(m)) or register(m, f, cfg))
    with registration.shared_registrations():
        first = registration.interpolate_between(a, b, fr)
        again = registration.interpolate_between(torch.cat([b, a]), torch.cat([a, c]), torch.cat([1 - fr, fr]))
        registration.interpolate_between(a, b, fr, {"deform_iters": 5})
    assert sizes == [1] * 6  # (a, b) each way; then only (a, c); then (a, b) again under another setting
    registration.interpolate_between(a, b, fr)
    assert sizes == [1] * 8
    torch.testing.assert_close(first, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(again[:1], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(again[1:], alone_ac, atol=1e-6, rtol=0)


def test_complete_fills_missing_slices_with_cubic_or_registration(tiny_dataset, tmp_path):
    import nibabel as nib

    from monai_mrngan.apps.complete import complete_file
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import save_nifti
    from monai_mrngan.inference.components import Components, reference_grid

    entry = load_split(tiny_dataset, "test")[0]
    img = nib.load(entry["image"])
    v = np.asanyarray(img.dataobj).astype(np.float32)
    real = [i for i in range(v.shape[2]) if i % 4 == 0 or i == v.shape[2] - 1]
    holes = v.copy()
    holes[:, :, [i for i in range(v.shape[2]) if i not in real]] = np.nan
    save_nifti(holes, img.affine, tmp_path / "thick.nii.gz")
    assert 0.0 <= np.nanmin(holes) and np.nanmax(holes) <= 1.0  # already in [0, 1]: complete uses the values as they are
    for method, fill in (("cubic", cubic_fill), ("registration", registration_fill)):  # neither needs a trained stage
        out = complete_file(tmp_path / "thick.nii.gz", Components(), reference_grid(tiny_dataset), method=method, missing="nan")
        assert out.meta["method"] == method and out.meta["models"] == {}
        expected = fill(torch.from_numpy(np.moveaxis(v[:, :, real], 2, 0)), real, v.shape[2]).numpy()
        np.testing.assert_allclose(out.data, np.moveaxis(expected, 0, 2), atol=1e-4)
