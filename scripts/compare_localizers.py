"""Train and evaluate FFN / CNN / DCNN / DCNN-Res on the same split through the slice_localization bundle.

Each network is trained with ``configs/train.json`` (its ``network_def`` swapped on the command line,
everything else shared: data, split, augmentation, optimizer, epochs, time limit), then scored on the
test split with ``configs/evaluate.json``. Prints (and writes ``OUTPUT_DIR/table.md`` and
``table.json``) a table laid out like the paper's Table 1, with MAE, the training-mean baseline,
training time and parameter count.

    python scripts/compare_localizers.py --dataset_dir /work/data/ixi_2mm_128 --output_dir runs/compare \\
        --epochs 6 --time_limit_s 600 --downsample 2

Each run is a subprocess (``python -m monai.bundle run``); a finished network is skipped when its
``test/metrics.json`` exists, so an interrupted comparison resumes (``--force`` retrains).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "slice_localization"
NETWORKS = {
    "FFN": "monai_mrngan.networks.localizers.LocalizerFFN",
    "CNN": "monai_mrngan.networks.localizers.LocalizerCNN",
    "DCNN": "monai_mrngan.networks.localizers.LocalizerDCNN",
    "DCNN-Res": "monai_mrngan.networks.localizers.LocalizerDCNNRes",
}


def _bundle(configs: list[str], args: dict, log: Path, timeout: float | None) -> tuple[int, float]:
    files = "[" + ",".join(f"'{BUNDLE / 'configs' / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(BUNDLE)]
    for k, v in args.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    return rc, time.time() - t0


def _params(target: str, downsample: int, spatial_size: int) -> int:
    import importlib

    module, name = target.rsplit(".", 1)
    net = getattr(importlib.import_module(module), name)(spatial_size=spatial_size, downsample=downsample)
    return sum(p.numel() for p in net.parameters())


def compare(
    dataset_dir: str,
    output_dir: str = "runs/compare_localizers",
    networks: str | tuple = "FFN,CNN,DCNN,DCNN-Res",
    epochs: int = 6,
    time_limit_s: float = 600,
    downsample: int | dict = 1,
    learning_rate: float = 3e-4,
    spatial_size: int = 128,
    force: bool = False,
    extra: str | dict = "",
) -> dict:
    """Train + evaluate each network; return {name: metrics} and write table.md / table.json.

    Args:
        dataset_dir: a prepared dataset (``datalist.json`` with training / validation / test).
        output_dir: one folder per network (models, eval, test, log.txt) and the tables.
        networks: comma-separated subset of FFN, CNN, DCNN, DCNN-Res.
        epochs: training epochs (each epoch samples ``slices_per_volume`` slices per training volume).
        time_limit_s: wall-clock cap on each training run (Ignite ``TimeLimit``; the best
            checkpoint so far is kept and evaluated).
        downsample: average-pool inputs by this factor inside the networks (1 = full resolution);
            an int for all, or per network, e.g. '{"CNN": 2}' (others 1).
        learning_rate: Adam learning rate shared by all networks.
        extra: more bundle overrides as JSON, e.g. '{"slices_per_volume": 8}'.
    """
    names = networks.split(",") if isinstance(networks, str) else list(networks)
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise SystemExit(f"unknown network(s) {unknown}; choose from {list(NETWORKS)}")
    if not (Path(dataset_dir) / "datalist.json").is_file():
        raise SystemExit(f"{dataset_dir}: no datalist.json; prepare the dataset first")
    out = Path(output_dir).resolve()
    extra_args = json.loads(extra) if isinstance(extra, str) and extra else dict(extra or {})
    results: dict[str, dict] = {}
    for name in names:
        run = out / name
        run.mkdir(parents=True, exist_ok=True)
        metrics_file = run / "test" / "metrics.json"
        info_file = run / "train_info.json"
        ds = int(downsample.get(name, 1)) if isinstance(downsample, dict) else int(downsample)
        common = {
            "dataset_dir": str(Path(dataset_dir).resolve()),
            "ckpt_dir": str(run / "models"),
            "spatial_size": [spatial_size, spatial_size],
            "network_def#_target_": NETWORKS[name],
            "network_def#downsample": ds,
            **extra_args,
        }
        if force or not metrics_file.is_file():
            if force:
                for f in (run / "models").glob("*.pt"):
                    f.unlink()
            print(f"[{name}] training (epochs {epochs}, limit {time_limit_s:.0f} s) -> {run}", flush=True)
            train_args = {**common, "output_dir": str(run / "eval"), "epochs": epochs, "learning_rate": learning_rate,
                          "time_limit_s": time_limit_s}
            rc, wall = _bundle(["train.json"], train_args, run / "log.txt", timeout=time_limit_s * 1.5 + 600)
            if rc != 0 or not (run / "models" / "model.pt").is_file():
                print(f"[{name}] training failed (rc {rc}); see {run / 'log.txt'}", flush=True)
                continue
            info_file.write_text(json.dumps({"train_wall_s": wall, "epochs": epochs, "time_limit_s": time_limit_s}))
            print(f"[{name}] evaluating on the test split", flush=True)
            rc, _ = _bundle(["train.json", "evaluate.json"], {**common, "output_dir": str(run / "test")}, run / "log.txt", None)
            if rc != 0:
                print(f"[{name}] evaluation failed (rc {rc}); see {run / 'log.txt'}", flush=True)
                continue
        res = json.loads(metrics_file.read_text())
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        results[name] = {**res, "train_wall_s": info.get("train_wall_s"), "downsample": ds,
                         "params": _params(NETWORKS[name], ds, spatial_size)}
        print(f"[{name}] MAE {res['model']['mae_mm']:.2f} mm, five-class accuracy {res['model']['accuracy']:.4f}", flush=True)
    if not results:
        raise SystemExit("no network finished")
    from monai_mrngan.metrics.localization import format_table

    first = next(iter(results.values()))
    columns = {n: r["model"] for n, r in results.items()}
    columns["train-mean baseline"] = first["baseline"]
    extra_rows = {
        "Training time (min)": {n: f"{r['train_wall_s'] / 60:.1f}" for n, r in results.items() if r.get("train_wall_s")},
        "Parameters (M)": {n: f"{r['params'] / 1e6:.2f}" for n, r in results.items()},
        "Input pooling": {n: f"{r['downsample']}x" for n, r in results.items()},
    }
    table = format_table(columns, extra_rows)
    header = (
        f"Test split: {first['n_slices']} slices of {first['n_subjects']} subjects; epochs {epochs}, time limit "
        f"{time_limit_s:.0f} s per network, Adam lr {learning_rate:g}."
    )
    text = f"{header}\n\n{table}\n"
    print(text, flush=True)
    from monai_mrngan.data.io import save_json

    (out / "table.md").write_text(text)
    save_json({"settings": {"epochs": epochs, "time_limit_s": time_limit_s, "downsample": downsample,
                            "learning_rate": learning_rate}, "results": results}, out / "table.json")
    return {n: r["model"] for n, r in results.items()}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    fire.Fire(functools.wraps(compare)(lambda *a, **k: compare(*a, **k) and None))
