"""Train and evaluate the four bundles in order, through ``monai.bundle``, under one work folder.

``run_pipeline(dataset_dir, workdir, preset)`` runs each step of each stage in :data:`STAGES`
(training, for the prior also building the mean brain / atlas bank, then evaluation on the test
split) as

    python -m monai.bundle run --config_file [<step configs>] --bundle_root bundles/<stage>
        --dataset_dir DATASET --ckpt_dir WORKDIR/<stage>/models --output_dir WORKDIR/<stage>/eval
        <network sizes> <links to earlier stages> <preset overrides>

and keeps each step's console output in ``WORKDIR/<stage>/<step>.log``. A stage whose ``WORKDIR/<stage>/done.json`` exists is
skipped; an interrupted stage resumes from its last checkpoint (``models/last.pt``), because the
bundles restore it on start. Later stages find earlier stages' weights through overrides that
point into WORKDIR, so the top-level bundle refers to, and never copies, the stage weights.
Each bundle runs in its own process, so a stage's memory is returned before the next starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..data.datalist import datalist_path
from ..data.io import save_json

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
DONE_NAME = "done.json"
RUN_INFO_NAME = "pipeline.json"


def read_run_info(workdir: str | os.PathLike) -> dict:
    """What ``run_pipeline`` recorded about a work folder (dataset, preset)."""
    path = Path(workdir) / RUN_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a pipeline work folder; run `python -m monai_mrngan pipeline` first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Step:
    """One ``monai.bundle run`` of a stage: a name and the config files it combines.

    ``tuned``: the step reads the preset's training overrides (epochs, time limit, lr ...);
    ``links``: (workdir, per-stage fixed overrides) -> overrides that point the step at earlier
    stages' outputs (and at how those stages were built);
    ``when``: (the stage's overrides, fixed and preset) -> whether the step runs.
    """

    name: str
    configs: tuple[str, ...]
    tuned: bool = True
    links: Callable[[Path, dict], dict] = field(default=lambda w, fixed: {})
    when: Callable[[dict], bool] = field(default=lambda overrides: True)


def _weights(w: Path, stage: str, name: str = "model.pt") -> str:
    return str(w / stage / "models" / name)


def _mrngan_links(w: Path, fixed: dict) -> dict:
    return {
        "flow_ckpt": _weights(w, "flow_generation"),
        "prior_path": _weights(w, "brain_generalization", "atlas_bank.pt"),
        "localizer_ckpt": _weights(w, "slice_localization"),
    }


TRAIN, EVALUATE = ("train.json",), ("train.json", "evaluate.json")
STAGES: dict[str, tuple[Step, ...]] = {
    "slice_localization": (Step("train", TRAIN), Step("evaluate", EVALUATE)),
    "brain_generalization": (
        Step("mean_brain", ("mean_brain.json",), tuned=False),
        Step("train", TRAIN),
        Step("inference", ("inference.json",), tuned=False),
        Step("evaluate", EVALUATE, links=lambda w, fixed: {
            "evaluate#localizer_weights": _weights(w, "slice_localization"),
            "evaluate#localizer_overrides": fixed.get("slice_localization", {}),
        }),
    ),
    "flow_generation": (Step("train", TRAIN), Step("evaluate", EVALUATE)),
    # prior_cache: the fitted-prior cache training reads (use_prior_cache); quick when it is already built.
    # calibrate: the uncertainty map's calibration on the validation split, refitted after every training run
    "mrngan": (
        Step("prior_cache", ("train.json", "prior_cache.json"), links=_mrngan_links, when=lambda o: bool(o.get("use_prior_cache"))),
        Step("train", TRAIN, links=_mrngan_links),
        Step("calibrate", ("train.json", "calibrate.json"), links=_mrngan_links),
        Step("evaluate", EVALUATE, links=_mrngan_links),
    ),
}

# Per preset and stage: config overrides (ids of the stage's train.json); "skip_steps" names steps
# of the stage that the preset leaves out. `demo` fits in 15 CPU
# minutes on the 64 px phantoms; `ixi2mm` in 75 CPU minutes at 2 mm / 128 px; `paper` is 256 px
# with the paper's epochs, meant for a GPU.
PRESETS: dict[str, dict[str, dict]] = {
    "demo": {
        "slice_localization": {"epochs": 100, "time_limit_s": 240},
        "brain_generalization": {"epochs": 100, "time_limit_s": 60},
        "flow_generation": {"epochs": 100, "time_limit_s": 150, "lr": 0.001},
        # fitted-prior cache of the first 12 training volumes + 2 validation volumes (9 fits each,
        # about 15 s per volume on one busy core, load 6.5): about 1.5 min with 2 workers; training
        # gives back 50 s of its old 150 s
        "mrngan": {"epochs": 100, "time_limit_s": 100, "lr": 0.001, "use_prior_cache": True, "train_limit": 12},
    },
    # ixi2mm (2 cores, measured whole 2026-12-06, bundle 0.7.0): 68.8 min, peak memory 4.2 GB. Localization
    # 12.3 + 1.1 min, mean brain + bank + its evaluation 1.3 min, pix2pix 20.1 + 1.3 min, MRNGAN cache 1.0 min
    # (the first 24 training + 5 validation volumes, 2 workers), training 15.2 min (the 900 s limit: 143 of
    # 150 epochs, the interp cell registering each gap run's ends), calibration 4.7 min, evaluation 11.8 min.
    # Bundle 0.7.1's calibrate step reconstructs 8 scanner-augmented validation copies too. Measured whole again
    # at 7150568 (2026-12-06): 68.6 min, peak memory 4.4 GB (localization 12.2 + 1.0 min, mean brain 1.4 min,
    # pix2pix 20.2 + 1.4 min, cache 0.8 min, training 15.1 min, calibration 6.3 min, evaluation 10.2 min;
    # light one-off scripts shared the machine at times); every evaluation figure the same as at 0.7.0 to the digit.
    # Training MRNGAN on all 120 volumes (cache 4.9 min) was measured no better (few slices -0.07 to -0.10 dB,
    # one slice +0.10 dB, same 15 min of training; 2026-12-02), so the first 24 stay.
    # ixi2mm trains with intensity_augmentation (randomised bias field, gamma, histogram, blur, noise,
    # gain per training volume) so the stages do not learn IXI's one scanner; the time limits hold, the
    # augmentation costing some iterations (about 0.25 s per volume drawn, 128 x 128 x 101, busy 2 cores).
    # demo leaves it off: its 15-minute ranking on the phantoms stays as measured.
    # ixi2mm's cell also trains with thick given slices in 30 % of its runs (given_slab_prob; the targets stay sharp).
    # Measured whole with it (2026-12-06, bundle 0.7.2): 71.9 min, peak RSS 4.9 GB, evaluation 708 s with its thick
    # case; against the cell without slab runs +0.11 dB on 6 mm slabs, within the noise of a retraining, and nothing
    # lost on sharp slices (mrngan docs, "Thick-slab scans").
    # Bundle 0.7.7's calibrate step also reconstructs 8 validation subjects as thick-slice scans: 616 s against 446 s
    # (run alone on those stages, 2026-12-07), so about 74.7 min for the whole preset. Measured whole at dc67f36
    # (2026-12-07) on a slower machine (MRNGAN 86 epochs in its 900 s, not 143; the untimed steps 10-20 % slower):
    # 80.9 min, peak RSS 5.3 GB: localization 12.3 + 1.3 min, mean brain 1.5 min, pix2pix 20.2 + 1.6 min, cache 1.3 min,
    # training 15.2 min, calibration 11.7 min, evaluation 15.7 min. The localizer's epoch with its validation took 7.5
    # min, and its 12-min limit spent 4.5 more on an epoch no validation saw: since bundle 0.7.8 every train.json stops
    # at the last epoch that fits (engines.time_budget; the same models), and the calibrate step gives 6 validation
    # subjects thick-slice cases, not 8. Since bundle 0.7.9 calibrate and evaluate reconstruct two subjects at a time
    # (evaluation.subjects; one process kept 1.25 cores busy): measured whole at 03fd4bf on that same machine, 64.4 min,
    # largest process 4.0 GB (localization 7.0 + 1.3, mean brain 1.8, pix2pix 19.8 + 1.3, cache 1.2, training 15.1,
    # calibration 7.4, evaluation 9.4 min); the same models and evaluation figures as 0.7.8.
    "ixi2mm": {
        "slice_localization": {"epochs": 100, "time_limit_s": 720, "intensity_augmentation": True},
        # the GAN route is not what MRNGAN leans on (the fitted atlas prior is): skipped to save budget
        "brain_generalization": {"skip_steps": ["train", "inference"]},
        "flow_generation": {"epochs": 100, "time_limit_s": 1200, "lr": 0.001, "intensity_augmentation": True},
        "mrngan": {"epochs": 150, "time_limit_s": 900, "lr": 0.001, "run_length": 12, "use_prior_cache": True, "train_limit": 24,
                   "intensity_augmentation": True, "given_slab_prob": 0.3},
    },
    "paper": {
        "slice_localization": {"epochs": 10},
        "brain_generalization": {"epochs": 1500},
        "flow_generation": {"epochs": 100},
        "mrngan": {"epochs": 100},
    },
}


def size_overrides(dataset_dir: str | os.PathLike) -> dict[str, dict]:
    """Per stage, the ids that must follow the prepared in-plane size (networks with dense layers).

    Applied to every step of the stage (training, inference, evaluation) and recorded in the
    work folder so ``reconstruct`` builds the same networks.
    """
    import nibabel as nib

    from ..data.datalist import load_split

    entries = load_split(dataset_dir, "training", 1) or load_split(dataset_dir, "test", 1)
    if not entries:
        raise ValueError(f"{dataset_dir}: the prepared dataset lists no volumes")
    h, w = (int(n) for n in nib.load(entries[0]["image"]).shape[:2])
    return {
        "slice_localization": {"spatial_size": [h, w]},
        "brain_generalization": {"image_size": h},
    }


def _override_args(overrides: dict) -> list[str]:
    """``--key value`` pairs as ``monai.bundle run`` (python-fire) reads them: non-string values as
    Python literals, since fire reads JSON's ``true`` / ``false`` / ``null`` as strings (and
    ``--use_prior_cache false`` would then be the truthy string ``'false'``)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    return args


def bundle_command(stage: str, step: Step, dataset_dir: Path, workdir: Path, overrides: dict,
                   bundles_dir: Path = BUNDLES_DIR, fixed: dict | None = None) -> list[str]:
    """The ``python -m monai.bundle run`` command line of one step of a stage.

    ``fixed``: per-stage overrides that hold for every step (network sizes); this stage's apply.
    """
    root = bundles_dir / stage
    configs = [str(root / "configs" / c) for c in step.configs]
    base = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(workdir / stage / "models"),
        "output_dir": str(workdir / stage / "eval"),
    }
    tuned = overrides if step.tuned else {}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
            *_override_args({**base, **(fixed or {}).get(stage, {}), **step.links(workdir, fixed or {}), **tuned})]


def _run_logged(cmd: Sequence[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        if proc.wait() != 0:
            raise RuntimeError(f"{log}: stage command failed with exit status {proc.returncode}; see this log")


def run_pipeline(
    dataset_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    preset: str = "demo",
    stages: Sequence[str] | None = None,
    time_budget_s: float | None = None,
    force: bool = False,
    bundles_dir: str | os.PathLike = BUNDLES_DIR,
    stage_overrides: dict[str, dict] | None = None,
) -> dict:
    """Train and evaluate every stage in order; returns ``{stage: done record}``.

    Args:
        dataset_dir: a prepared dataset (``python -m monai_mrngan prepare``).
        workdir: where every stage's weights, TensorBoard logs and evaluation go.
        preset: ``demo``, ``ixi2mm`` or ``paper`` (see :data:`PRESETS`).
        stages: run only these stages (default all, in order).
        time_budget_s: training time limit per stage in seconds, replacing the preset's (the train
            configs round it to whole seconds, at least 1).
        force: re-run stages already finished.
        stage_overrides: per stage, extra overrides for every step (e.g. a smaller network);
            recorded in the work folder so ``reconstruct`` rebuilds the same networks.
    """
    dataset_dir, workdir, bundles_dir = Path(dataset_dir), Path(workdir), Path(bundles_dir)
    if not datalist_path(dataset_dir).is_file():
        raise FileNotFoundError(f"{datalist_path(dataset_dir)}: no prepared dataset; run `python -m monai_mrngan prepare`")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = list(STAGES)
    unknown = set(stages or []) - set(names)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {names}")
    if stage_overrides is None and (workdir / RUN_INFO_NAME).is_file():
        stage_overrides = read_run_info(workdir).get("extra_overrides")  # a resumed run builds the same networks
    sizes = size_overrides(dataset_dir)
    for stage, extra in (stage_overrides or {}).items():
        sizes[stage] = {**sizes.get(stage, {}), **extra}
    # the top-level bundle rebuilds the stage networks exactly as they were trained
    sizes["mrngan"] = {
        "localizer_overrides": sizes.get("slice_localization", {}),
        "flow_overrides": sizes.get("flow_generation", {}),
        **sizes.get("mrngan", {}),
    }
    save_json({"dataset_dir": str(dataset_dir.resolve()), "preset": preset, "extra_overrides": stage_overrides,
               "stage_overrides": sizes}, workdir / RUN_INFO_NAME)
    results = {}
    for stage, steps in STAGES.items():
        if stages and stage not in stages:
            continue
        done = workdir / stage / DONE_NAME
        if done.is_file() and not force:
            print(f"pipeline: {stage} already finished ({done}); skipping", flush=True)
            results[stage] = json.loads(done.read_text())
            continue
        overrides = dict(PRESETS[preset].get(stage, {}))
        skip = set(overrides.pop("skip_steps", []))
        if time_budget_s is not None:
            overrides["time_limit_s"] = float(time_budget_s)
        record = {"preset": preset, "dataset_dir": str(dataset_dir), "overrides": overrides, "seconds": {}}
        for step in steps:
            if step.name in skip or not step.when({**sizes.get(stage, {}), **overrides}):
                continue
            print(f"pipeline: {stage}: {step.name}", flush=True)
            t0 = time.time()
            _run_logged(bundle_command(stage, step, dataset_dir, workdir, overrides, bundles_dir, sizes),
                        workdir / stage / f"{step.name}.log")
            record["seconds"][step.name] = round(time.time() - t0, 1)
            if step.name == "train" and not Path(_weights(workdir, stage)).is_file():  # every stage keeps its best at validation
                raise RuntimeError(f"{workdir / stage / 'train.log'}: training stopped before its first validation, so no weights "
                                   f"were saved (time_limit_s {overrides.get('time_limit_s')}); give it more time")
        save_json(record, done)
        results[stage] = record
    return results
