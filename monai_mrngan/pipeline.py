"""Train and evaluate the four bundles in order, through ``monai.bundle``, under one work folder.

``run_pipeline(dataset_dir, workdir, preset)`` runs, for each stage in :data:`STAGES`,

    python -m monai.bundle run --config_file [<stage configs>] --bundle_root bundles/<stage>
        --dataset_dir DATASET --ckpt_dir WORKDIR/<stage>/models --output_dir WORKDIR/<stage>/eval
        <preset overrides>

first training, then evaluation on the test split. Each stage's console output is also kept in
``WORKDIR/<stage>/{train,evaluate}.log``. A stage whose ``WORKDIR/<stage>/done.json`` exists is
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

from .data.datalist import datalist_path
from .data.io import save_json

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
DONE_NAME = "done.json"
RUN_INFO_NAME = "pipeline.json"


def read_run_info(workdir: str | os.PathLike) -> dict:
    """What ``run_pipeline`` recorded about a work folder (dataset, preset)."""
    path = Path(workdir) / RUN_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a pipeline work folder; run `python -m monai_mrngan pipeline` first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Stage:
    """One bundle of the chain: its folder name and the config files of its two steps."""

    name: str
    train: tuple[str, ...] = ("train.json",)
    evaluate: tuple[str, ...] = ("train.json", "evaluate.json")
    # overrides that wire in earlier stages' outputs: (workdir) -> {id: value}
    links: Callable[[Path], dict] = field(default=lambda w: {})


def _mrngan_links(w: Path) -> dict:
    return {
        "flow_ckpt": str(w / "flow_generation" / "models" / "model.pt"),
        "prior_path": str(w / "brain_generalization" / "models" / "atlas_bank.pt"),
        "localizer_ckpt": str(w / "slice_localization" / "models" / "model.pt"),
    }


def _prior_links(w: Path) -> dict:
    return {"localizer_ckpt": str(w / "slice_localization" / "models" / "model.pt")}


STAGES: tuple[Stage, ...] = (
    Stage("slice_localization"),
    Stage("brain_generalization", links=_prior_links),
    Stage("flow_generation"),
    Stage("mrngan", links=_mrngan_links),
)

# Per preset and stage: config overrides (ids of the stage's train.json). `demo` fits in 15 CPU
# minutes on the 64 px phantoms; `ixi2mm` in 75 CPU minutes at 2 mm / 128 px; `paper` is 256 px
# with the paper's epochs, meant for a GPU.
PRESETS: dict[str, dict[str, dict]] = {
    "demo": {
        "slice_localization": {"epochs": 3, "time_limit_s": 120},
        "brain_generalization": {"epochs": 2, "time_limit_s": 120},
        "flow_generation": {"epochs": 3, "time_limit_s": 180},
        "mrngan": {"epochs": 2, "time_limit_s": 180},
    },
    "ixi2mm": {
        "slice_localization": {"epochs": 30, "time_limit_s": 900},
        "brain_generalization": {"epochs": 5, "time_limit_s": 600},
        "flow_generation": {"epochs": 50, "time_limit_s": 1500, "lr": 0.001},
        "mrngan": {"epochs": 30, "time_limit_s": 1200},
    },
    "paper": {
        "slice_localization": {"epochs": 10},
        "brain_generalization": {"epochs": 1500},
        "flow_generation": {"epochs": 100},
        "mrngan": {"epochs": 100},
    },
}


def _override_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def bundle_command(stage: Stage, step: str, dataset_dir: Path, workdir: Path, overrides: dict,
                   bundles_dir: Path = BUNDLES_DIR) -> list[str]:
    """The ``python -m monai.bundle run`` command line of one stage's step (``train``/``evaluate``)."""
    root = bundles_dir / stage.name
    configs = [str(root / "configs" / c) for c in (stage.train if step == "train" else stage.evaluate)]
    base = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(workdir / stage.name / "models"),
        "output_dir": str(workdir / stage.name / "eval"),
    }
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
            *_override_args({**base, **stage.links(workdir), **overrides})]


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
) -> dict:
    """Train and evaluate every stage in order; returns ``{stage: done record}``.

    Args:
        dataset_dir: a prepared dataset (``python -m monai_mrngan prepare``).
        workdir: where every stage's weights, TensorBoard logs and evaluation go.
        preset: ``demo``, ``ixi2mm`` or ``paper`` (see :data:`PRESETS`).
        stages: run only these stages (default all, in order).
        time_budget_s: training time limit per stage, replacing the preset's.
        force: re-run stages already finished.
    """
    dataset_dir, workdir, bundles_dir = Path(dataset_dir), Path(workdir), Path(bundles_dir)
    if not datalist_path(dataset_dir).is_file():
        raise FileNotFoundError(f"{datalist_path(dataset_dir)}: no prepared dataset; run `python -m monai_mrngan prepare`")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = [s.name for s in STAGES]
    unknown = set(stages or []) - set(names)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {names}")
    save_json({"dataset_dir": str(dataset_dir.resolve()), "preset": preset}, workdir / RUN_INFO_NAME)
    results = {}
    for stage in STAGES:
        if stages and stage.name not in stages:
            continue
        done = workdir / stage.name / DONE_NAME
        if done.is_file() and not force:
            print(f"pipeline: {stage.name} already finished ({done}); skipping", flush=True)
            results[stage.name] = json.loads(done.read_text())
            continue
        overrides = dict(PRESETS[preset].get(stage.name, {}))
        if time_budget_s is not None:
            overrides["time_limit_s"] = float(time_budget_s)
        record = {"preset": preset, "dataset_dir": str(dataset_dir), "overrides": overrides}
        for step in ("train", "evaluate"):
            print(f"pipeline: {stage.name}: {step}", flush=True)
            t0 = time.time()
            _run_logged(bundle_command(stage, step, dataset_dir, workdir, overrides, bundles_dir),
                        workdir / stage.name / f"{step}.log")
            record[f"{step}_seconds"] = round(time.time() - t0, 1)
        save_json(record, done)
        results[stage.name] = record
    return results
