"""Markdown tables of one MRNGAN evaluation, and the quality issue's (#13) targets checked against it.

Reads what ``evaluate`` (the mrngan bundle's ``evaluate.json``) wrote: ``report.json``,
``report_meta.json`` and ``per_distance.csv``. Prints the whole-volume single-slice table, head-only
SSIM / PSNR at chosen distances, the few-slice table with MRNGAN's margin over linear, cubic and
registration-based interpolation, the uncertainty scores, and each target with PASS / FAIL and its margin.

    python -m scripts.bench.eval_tables --eval_dir WORKDIR/mrngan/eval/reconstruction [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

DISTANCES = (1, 2, 3, 5, 10, 20, 30, 40)


def _per_distance(path: Path) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    rows: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            rows.setdefault((r["setting"], r["method"]), {})[int(r["d"])] = {k: float(r[k]) for k in ("ssim", "ssim_head", "psnr")}
    return rows


def single_slice_targets(report: dict, by_d: dict) -> list[tuple[str, bool, str]]:
    m = report["single_slice"]["methods"]
    out = []
    if "mrngan" in m and "prior" in m:
        ds, dp = m["mrngan"]["ssim_head"] - m["prior"]["ssim_head"], m["mrngan"]["psnr"] - m["prior"]["psnr"]
        out.append(("one slice, whole volume: head SSIM >= fitted prior + 0.02", ds >= 0.02, f"{ds:+.4f}"))
        out.append(("one slice, whole volume: PSNR >= fitted prior + 0.3 dB", dp >= 0.3, f"{dp:+.3f} dB"))
    mr = by_d.get(("single", "mrngan"), {})
    others = [by_d[("single", o)] for o in ("copy", "prior", "pix2pix_iterative") if ("single", o) in by_d]
    if mr and others:
        worst_s = worst_p = float("inf")
        below_s = below_p = 0
        for d in range(1, 41):
            if d not in mr:
                continue
            best_s = max(o[d]["ssim_head"] for o in others if d in o)
            best_p = max(o[d]["psnr"] for o in others if d in o)
            gs, gp = mr[d]["ssim_head"] - best_s, mr[d]["psnr"] - best_p
            worst_s, worst_p = min(worst_s, gs), min(worst_p, gp)
            below_s += gs < -0.005
            below_p += gp < -0.05
        out.append(("one slice, every d = 1..40: head SSIM >= best baseline (within 0.005)", below_s == 0,
                    f"below at {below_s} of 40 distances, worst {worst_s:+.4f}"))
        out.append(("one slice, every d = 1..40: PSNR >= best baseline (within 0.05 dB)", below_p == 0,
                    f"below at {below_p} of 40 distances, worst {worst_p:+.3f} dB"))
    return out


def few_slice_targets(report: dict) -> list[tuple[str, bool, str]]:
    out = []
    for k, row in sorted(report["few_slices"].items(), key=lambda kv: int(kv[0][1:])):
        if "mrngan" not in row:
            continue
        mr = row["mrngan"]
        if k in ("k4", "k8"):
            for base, need in (("linear", 1.5), ("cubic", 1.0)):
                if base in row:
                    gap = mr["psnr"] - row[base]["psnr"]
                    out.append((f"{k}: PSNR >= {base} + {need} dB", gap >= need, f"{gap:+.3f} dB"))
        best = max((row[b]["ssim_head"] for b in ("linear", "cubic") if b in row), default=None)
        if best is not None:
            gap = mr["ssim_head"] - best
            out.append((f"{k}: head SSIM above linear and cubic", gap > 0, f"{gap:+.4f}"))
    return out


def _few_table(cases: dict) -> None:
    """One markdown row per k: each method's SSIM / head-only SSIM / PSNR, and MRNGAN's PSNR margin over each baseline."""
    ks = sorted(cases, key=lambda k: int(k[1:]))
    fm = list(next(iter(cases.values())).keys()) if ks else []
    bases = [b for b in ("linear", "cubic", "registration", "linear_plain", "cubic_plain") if b in fm]  # *_plain: thick slices, no slab step
    print("| k | " + " | ".join(fm + [f"mrngan - {b}" for b in bases]) + " |\n|---|" + "---|" * (len(fm) + len(bases)))
    for k in ks:
        row = cases[k]
        cells = [f"{row[m]['ssim']:.3f} / {row[m]['ssim_head']:.3f} / {row[m]['psnr']:.2f}" for m in fm]
        gaps = [f"{row['mrngan']['psnr'] - row[b]['psnr']:+.2f} dB" if "mrngan" in row and b in row else "" for b in bases]
        print(f"| {k[1:]} | " + " | ".join(cells + gaps) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval_dir", required=True, type=Path)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = json.loads((args.eval_dir / "report.json").read_text())
    meta_path = args.eval_dir / "report_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    by_d = _per_distance(args.eval_dir / "per_distance.csv")
    if meta:
        loc = meta.get("localization_abs_error_mean")
        raw = meta.get("localizer_abs_error_mean")
        print(f"subjects {len(meta.get('subjects', []))}, inputs at p = {meta.get('input_positions')}, localized {meta.get('localized_inputs')}"
              + (f" (localizer {raw * 200:.1f} mm, refined {loc * 200:.1f} mm)" if loc is not None and raw is not None else "")
              + f", {meta.get('seconds')} s\n")
    methods = report["single_slice"]["methods"]
    print("| method | SSIM | head-only SSIM | PSNR dB |\n|---|---:|---:|---:|")
    for m, r in methods.items():
        print(f"| {m} | {r['ssim']:.3f} | {r['ssim_head']:.3f} | {r['psnr']:.2f} |")
    print("\nhead-only SSIM / PSNR dB at distance d (slices) from the input:\n")
    print("| method | " + " | ".join(f"d = {d}" for d in DISTANCES) + " |\n|---|" + "---|" * len(DISTANCES))
    for m in methods:
        row = by_d.get(("single", m), {})
        print(f"| {m} | " + " | ".join(f"{row[d]['ssim_head']:.3f} / {row[d]['psnr']:.2f}" if d in row else "" for d in DISTANCES) + " |")
    print("\nfew slices (every k-th given; missing slices scored): SSIM / head-only SSIM / PSNR dB\n")
    _few_table(report["few_slices"])
    if report.get("thick_slices"):
        print("\nthick slices (every k-th given as the mean of the k slices around it; missing slices scored against the sharp truth)\n")
        _few_table(report["thick_slices"])
    unc = report.get("uncertainty")
    if unc:
        print("\nuncertainty: | case | Spearman voxel | Spearman slice | deciles 2-10 within 25 % |\n|---|---:|---:|---|")
        for case, u in unc.items():
            rel = u.get("reliability") or []
            off = [i + 1 for i, r in enumerate(rel) if i >= 1 and r["predicted"] > 0 and abs(r["true"] / r["predicted"] - 1) > 0.25]
            print(f"| {case} | {u['spearman_voxel']:.3f} | {u['spearman_slice']:.3f} | {'all' if not off else 'not deciles ' + str(off)} |")
    targets = single_slice_targets(report, by_d) + few_slice_targets(report)
    print("\n#13 targets:")
    for name, ok, margin in targets:
        print(f"- {'PASS' if ok else 'FAIL'}: {name} ({margin})")
    if args.json:
        Path(args.json).write_text(json.dumps({"targets": [{"target": n, "pass": ok, "margin": m} for n, ok, m in targets]}, indent=1))


if __name__ == "__main__":
    main()
