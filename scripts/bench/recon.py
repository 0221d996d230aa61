"""Reconstruction measurements: one slice (localization, refinement, fit, generation), every 8th slice, the pix2pix rollout, peak RSS, the fitted-prior cache."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


from .common import BUNDLES, REPO, Clock, PeakMemory, log, sync


# ----------------------------------------------------------------------------------- reconstruction
def mrngan_prior_fit() -> dict:
    """How the mrngan bundle fits the prior to the input slice (its inference.json ``prior_fit``)."""
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_file(str(BUNDLES / "mrngan" / "configs" / "inference.json"))["prior_fit"])


QUICK_FIT = {"affine_iters": 5, "deform_iters": 5}


def prior_fit_config(args: argparse.Namespace) -> dict:
    """The bundle's prior fit; ``--quick`` cuts its optimisation iterations (a smoke test, not a measurement)."""
    return {**mrngan_prior_fit(), **(QUICK_FIT if args.quick else {})}


class Timed(torch.nn.Module):
    """A network whose calls a :class:`Clock` times (still a module: ``localize`` finds its device and mode)."""

    def __init__(self, net: torch.nn.Module, clock: Clock) -> None:
        super().__init__()
        self.net, self.call = net, clock.wrap(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


def _networks(dataset_dir: Path, device: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """Localizer, pix2pix generator and MRNGAN cell from the bundles' inference.json network_def, random init."""
    from monai_mrngan.apps.pipeline import size_overrides
    from monai_mrngan.inference.components import load_bundle_network

    def net(stage: str) -> torch.nn.Module:
        torch.manual_seed(0)
        config = BUNDLES / stage / "configs" / "inference.json"
        return load_bundle_network(config, None, overrides=size_overrides(dataset_dir).get(stage, {}), device=device)

    return net("slice_localization"), net("flow_generation"), net("mrngan")


def _test_volume(dataset_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume

    entry = (load_split(dataset_dir, "test") or load_split(dataset_dir, "validation") or load_split(dataset_dir, "training"))[0]
    vol, _ = load_volume(entry["image"])
    return vol, np.asarray(entry["positions"], dtype=np.float64)


def one_reconstruction_rss(dataset_dir: str, bank: str, fit_json: str, device: str) -> None:
    """Child process of :func:`peak_rss`: load the networks and the prior, reconstruct a volume from one
    localized slice (refinement, fit, generation), print the process's peak RSS in MiB."""
    from monai_mrngan.inference.components import load_stage_prior
    from monai_mrngan.inference.reconstruct import reconstruct_volume
    from monai_mrngan.networks.contracts import next_fn_for

    localizer, generator, model = _networks(Path(dataset_dir), device)
    prior = load_stage_prior(bank, json.loads(fit_json))
    vol, grid = _test_volume(Path(dataset_dir))
    one = vol[:, :, int(np.argmin(np.abs(grid - 0.5)))]
    reconstruct_volume(one, None, method="mrngan", model=model, next_fn=next_fn_for(generator), prior=prior, localizer=localizer,
                       reference_positions=grid, device=device)
    print(f"PEAK_RSS_MIB {peak_rss_self():.1f}")


def peak_rss_self() -> float:
    """This process's peak RSS (MiB): ``VmHWM`` of its own memory map. ``ru_maxrss`` would not do in a child:
    Linux carries the parent's high-water mark across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss(dataset_dir: Path, bank: Path, fit: dict, device: str) -> float:
    """Peak RSS (MiB) of a whole one-slice reconstruction in a fresh process (interpreter, torch, networks,
    prior bank, localization, refinement, fit, generation): nothing left over from the other measurements."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.recon import one_reconstruction_rss; "
            "one_reconstruction_rss(*sys.argv[2:])")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts"), str(dataset_dir), str(bank), json.dumps(fit), device],
                         capture_output=True, text=True, env=env, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_RSS_MIB"):
            return float(line.split()[1])
    raise RuntimeError(f"peak RSS child failed: {(out.stdout + out.stderr)[-2000:]}")


def bench_prior_cache(dataset_dir: Path, bank: Path, fit: dict, device: str, volumes: int, positions: int = 9) -> dict:
    """The mrngan bundle's fitted-prior cache (:func:`monai_mrngan.atlas.cache.build_prior_cache`, one
    process) for ``volumes`` training volumes at ``positions`` input positions each, each volume's subject
    left out, only the slices the ``ixi2mm`` preset's training runs read (``run_slices`` = its
    ``run_length``) warped; measured on ``volumes`` volumes, scaled to 120."""
    import tempfile

    from monai_mrngan.apps.pipeline import PRESETS
    from monai_mrngan.atlas.cache import build_prior_cache, cache_positions

    run_slices = int(PRESETS["ixi2mm"]["mrngan"].get("run_length", 16))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_prior_cache(tmp, dataset_dir, bank, fit, positions=cache_positions(positions), limits={"training": volumes, "validation": 0},
                          device=device, run_slices=run_slices)
        sync(device)
        dt = time.perf_counter() - t0  # includes loading the bank and building its work-size copy once
    return {"volumes": volumes, "positions": positions, "run_slices": run_slices, "seconds": dt, "per_fit_s": dt / max(volumes * positions, 1),
            "scaled_120_s": dt / max(volumes, 1) * 120}


def bench_reconstruction(dataset_dir: Path, device: str, work: Path, bank: Path, args: argparse.Namespace) -> dict:
    from monai_mrngan.inference.components import load_stage_prior
    from monai_mrngan.inference.localize import localize
    from monai_mrngan.inference.reconstruct import reconstruct_volume, refine_positions
    from monai_mrngan.networks.contracts import next_fn_for

    gc.collect()
    mem = PeakMemory(device).__enter__()  # networks, prior bank, warm-up and the first one-slice reconstruction
    localizer, generator, model = _networks(dataset_dir, device)
    prior = load_stage_prior(bank, prior_fit_config(args))  # as the mrngan bundle loads its prior
    next_fn = next_fn_for(generator)
    vol, grid = _test_volume(dataset_dir)
    depth = len(grid)
    i0 = int(np.argmin(np.abs(grid - 0.5)))
    one = vol[:, :, i0]
    p0 = float(grid[i0])
    half = grid[depth // 4 : depth // 4 + (depth + 1) // 2]  # the same input slice, half the slices

    def mrngan(slices: Any, positions: list[float] | None, ref: np.ndarray) -> dict:
        """One reconstruction as the mrngan bundle runs it; ``positions`` None: localized and refined first."""
        fresh = prior.with_fit(prior.config)  # a new fit (no cached one)
        fit_clock, prior_clock, next_clock = Clock(device), Clock(device), Clock(device)
        cnn_clock, refine_clock = Clock(device), Clock(device)
        fits = []  # fitting calls that fitted (the others returned the cached fit for the same slice)

        many_clock = Clock(device)  # fit_many: the batched fit prior_fn_for runs before the slices (fit: inside slice_at)

        def counted(fn: Callable, clock: Clock) -> Callable:
            timed = clock.wrap(fn)

            def call(*a: Any, **k: Any) -> Any:
                before = fresh.last_fit
                out = timed(*a, **k)
                if fresh.last_fit is not before:
                    fits.append(1)
                return out
            return call

        fresh.fit, fresh.fit_many = counted(fresh.fit, fit_clock), counted(fresh.fit_many, many_clock)
        fresh.slice_at = prior_clock.wrap(fresh.slice_at)
        fresh.locate = refine_clock.wrap(fresh.locate)
        sync(device)
        t0 = time.perf_counter()
        rec = reconstruct_volume(slices, positions, method="mrngan", model=model, next_fn=next_clock.wrap(next_fn), prior=fresh,
                                 localizer=Timed(localizer, cnn_clock) if positions is None else None, reference_positions=ref, device=device)
        sync(device)
        total = time.perf_counter() - t0
        loc = cnn_clock.total + refine_clock.total
        fit_s = fit_clock.total + many_clock.total
        return {"slices": int(rec.volume.shape[2]), "inputs": len(rec.input_positions), "input_positions": [float(q) for q in rec.input_positions], "total_s": total,
                "localization_cnn_s": cnn_clock.total, "localization_refine_s": refine_clock.total, "localization_s": loc,
                "prior_fit_s": fit_s, "prior_fits": len(fits), "prior_fit_calls": fit_clock.calls + many_clock.calls,
                "generation_s": total - loc - fit_s, "pix2pix_s": next_clock.total, "pix2pix_calls": next_clock.calls,
                "prior_slices_s": prior_clock.total - fit_clock.total,
                "cell_and_rest_s": total - loc - fit_s - (prior_clock.total - fit_clock.total) - next_clock.total}

    def pix2pix(ref: np.ndarray, at: float) -> dict:
        """The rollout of the slice placed at ``at``: where the localized reconstruction placed it, so both
        generate the same slices (the random-init localizer moves it some slices off ``p0``)."""
        next_clock = Clock(device)
        sync(device)
        t0 = time.perf_counter()
        rec = reconstruct_volume(one, [at], method="pix2pix_iterative", next_fn=next_clock.wrap(next_fn), reference_positions=ref, device=device)
        sync(device)
        return {"slices": int(rec.volume.shape[2]), "total_s": time.perf_counter() - t0, "pix2pix_calls": next_clock.calls}

    def best(runs: list[dict]) -> dict:
        """Best of the repeats, part by part (contention from other jobs only ever adds time)."""
        out = dict(runs[0])
        for key in runs[0]:
            if key.endswith("_s"):
                out[key] = min(r[key] for r in runs)
        out["repeats"] = len(runs)
        return out

    # warm-up (first calls allocate, pick kernels): generation with an unfitted prior, localization, the
    # atlas refinement (builds the bank's work-size copy once, as loading a prior that scans does), pix2pix
    warm = prior.with_fit(dataclasses.replace(prior.config, mode="none", intensity="none"))
    reconstruct_volume(one, [p0], method="mrngan", model=model, next_fn=next_fn, prior=warm, reference_positions=half, device=device)
    est = localize(localizer, torch.as_tensor(one)[None, None].to(device)).cpu()
    refine_positions(prior.with_fit(prior.config), torch.as_tensor(one)[None, None], est)
    pix2pix(half, p0)

    res: dict = {"input_index": i0, "input_position": round(p0, 4), "grid_slices": depth}
    # the batching check: both directions of a one-slice reconstruction go through every network together
    sizes: dict[str, list[int]] = {"pix2pix": [], "cell": []}
    hooks = [generator.register_forward_pre_hook(lambda m, a: sizes["pix2pix"].append(int(a[0].shape[0]))),
             model.cell.register_forward_pre_hook(lambda m, a: sizes["cell"].append(int(a[0].shape[0])))]
    first = mrngan(one, None, grid)
    mem.__exit__(None, None, None)
    for h in hooks:
        h.remove()
    placed = first["input_positions"][0]  # the rollouts start where the localized slice was placed
    res["rollout_position"] = round(placed, 4)
    res["batch_sizes"] = {k: sorted(set(v)) for k, v in sizes.items()}
    res["batch_calls"] = {k: len(v) for k, v in sizes.items()}
    res["memory"] = mem.as_dict()
    res["prior_bank_mib"] = prior.bank.numel() * prior.bank.element_size() / 2**20
    res["prior_bank_dtype"] = str(prior.bank.dtype).replace("torch.", "")
    res["prior_work_bank_mib"] = sum(w.blur.numel() * w.blur.element_size() + w.sums.numel() * 4 for w in prior._work.values()) / 2**20
    runs: dict[str, list[dict]] = {"one_slice": [first], "one_slice_half": [], "pix2pix_iterative": [], "pix2pix_iterative_half": []}
    for r in range(args.repeats):  # interleaved, so a burst of load from other jobs hits all of them alike
        if r:
            runs["one_slice"].append(mrngan(one, None, grid))
        runs["pix2pix_iterative"].append(pix2pix(grid, placed))
        runs["one_slice_half"].append(mrngan(one, None, half))
        runs["pix2pix_iterative_half"].append(pix2pix(half, placed))
    for key, value in runs.items():
        res[key] = best(value)
    for key in ("localization_cnn_s", "localization_refine_s", "localization_s"):
        res[key] = res["one_slice"][key]
    res["one_slice"]["total_with_localization_s"] = res["one_slice"]["total_s"]
    every = list(range(0, depth, 8))
    res["every_8th"] = mrngan(vol[:, :, every].transpose(2, 0, 1), [float(grid[i]) for i in every], grid)
    if device == "cpu":
        log("peak RSS of a one-slice reconstruction in a fresh process")
        res["peak_rss_mib"] = peak_rss(dataset_dir, bank, prior_fit_config(args), device)
    log("fitted priors for training volumes x 9 positions")
    res["prior_cache"] = bench_prior_cache(dataset_dir, bank, prior_fit_config(args), device, 1 if args.quick else args.cache_volumes)
    return res
