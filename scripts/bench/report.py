"""The benchmark table, its scaling lines, targets and the JSON summary."""

from __future__ import annotations

import json
from typing import Any, Callable

from .common import STAGES, fmt


# -------------------------------------------------------------------------------------------- table
def rows_for(results: dict) -> list[tuple[str, str, Callable[[dict], Any]]]:
    """(label, unit, getter(result of one column)) for every table row."""
    def g(*keys: str) -> Callable[[dict], Any]:
        def get(r: dict) -> Any:
            for k in keys:
                if not isinstance(r, dict) or k not in r:
                    return None
                r = r[k]
            return r
        return get

    any_col = next(iter(results.values()))
    rows: list[tuple[str, str, Callable[[dict], Any]]] = [("machine load average (1 min) at the column's start", "", g("load_average_1min"))]
    labels = {"slice_localization": "localizer CNN", "brain_generalization": "brain-generalization GAN (G + D/3)",
              "flow_generation": "pix2pix GAN pair (G + D)", "mrngan": "MRNGAN cell unrolled"}
    trained = [s for s in STAGES if s in any_col["train"]]  # none with --skip_train
    for s in trained:
        tr = any_col["train"][s]
        extra = f", {tr['run_length'] - 1} steps" if s == "mrngan" else ""
        rows.append((f"train {labels[s]} [{tr['batch']}{extra}]", "it/s", g("train", s, "it_per_s")))
    for s in trained:
        rows.append((f"  peak memory: {s}", "MiB", lambda r, s=s: mem_cell(r, "train", s)))
    rec = any_col["recon"]
    d, h = rec["one_slice"]["slices"], rec["one_slice_half"]["slices"]
    rows += [
        (f"1 slice -> {d} slices: localization (CNN + atlas refinement)", "s", g("recon", "localization_s")),
        ("    localizer CNN", "s", g("recon", "localization_cnn_s")),
        ("    refinement by the prior's atlases", "s", g("recon", "localization_refine_s")),
        ("1 slice: prior fit", "s", g("recon", "one_slice", "prior_fit_s")),
        ("1 slice: generation (all below)", "s", g("recon", "one_slice", "generation_s")),
        ("    pix2pix calls", "s", g("recon", "one_slice", "pix2pix_s")),
        ("    prior slices", "s", g("recon", "one_slice", "prior_slices_s")),
        ("    cell steps + placement", "s", g("recon", "one_slice", "cell_and_rest_s")),
        ("1 slice: total (localization + fit + generation)", "s", g("recon", "one_slice", "total_with_localization_s")),
        ("1 slice: pix2pix_iterative rollout", "s", g("recon", "pix2pix_iterative", "total_s")),
        ("ratio 1 slice total / pix2pix", "x", lambda r: ratio(r, "total_with_localization_s")),
        ("ratio mrngan generation / pix2pix", "x", lambda r: ratio(r, "generation_s")),
        ("ratio mrngan fit + generation / pix2pix", "x", lambda r: ratio(r, "fit_and_generation_s")),
        (f"half volume (1 slice -> {h} slices): prior fit", "s", g("recon", "one_slice_half", "prior_fit_s")),
        ("half volume: generation", "s", g("recon", "one_slice_half", "generation_s")),
        ("half volume: pix2pix_iterative rollout", "s", g("recon", "pix2pix_iterative_half", "total_s")),
        (f"every 8th slice ({rec['every_8th']['inputs']} inputs): prior fits", "n", g("recon", "every_8th", "prior_fits")),
        ("every 8th slice: prior fit", "s", g("recon", "every_8th", "prior_fit_s")),
        ("every 8th slice: generation", "s", g("recon", "every_8th", "generation_s")),
        ("every 8th slice: total (fit + generation)", "s", g("recon", "every_8th", "total_s")),
        ("ratio every 8th slice / pix2pix", "x", lambda r: ratio(r, "every8")),
        ("  peak memory: reconstruction (load networks + bank, 1 slice; in this process)", "MiB", lambda r: mem_cell(r, "recon")),
        ("  peak RSS: one-slice reconstruction in a fresh process", "MiB", g("recon", "peak_rss_mib")),
        ("  of which the prior bank (as held: uint8)", "MiB", g("recon", "prior_bank_mib")),
        ("  and its work-size copy (fp16, plain + blurred)", "MiB", g("recon", "prior_work_bank_mib")),
        (f"fitted priors: {rec['prior_cache']['volumes']} volume(s) x 9 positions", "s", g("recon", "prior_cache", "seconds")),
        ("    per fit", "s", g("recon", "prior_cache", "per_fit_s")),
        ("    scaled to 120 volumes x 9 positions", "s", g("recon", "prior_cache", "scaled_120_s")),
    ]
    for s in STAGES if any(c.get("loaders") for c in results.values()) else ():
        b = any_col.get("loaders", {}).get(s) or next((c["loaders"][s] for c in results.values() if c.get("loaders")), {})
        rows.append((f"data: {s} train loader [{b.get('batch', '?')}]", "slices/s", g("loaders", s, "slices_per_s")))
    samplers = next((c["samplers"] for c in results.values() if c.get("samplers")), {})
    for name in samplers:
        rows.append((f"data: benchmark_slices.py '{name}'", "slices/s", lambda r, n=name: g("samplers", n, "slices_per_s")(r)))
    return rows


def ratio(r: dict, key: str) -> float | None:
    """A one-slice figure (or ``"every8"``, ``"fit_and_generation_s"``) over the pix2pix rollout of the same run."""
    try:
        rec = r["recon"]
        one = rec["one_slice"]
        value = {"every8": rec["every_8th"]["total_s"], "fit_and_generation_s": one["prior_fit_s"] + one["generation_s"]}.get(key)
        return (one[key] if value is None else value) / rec["pix2pix_iterative"]["total_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def mem_cell(r: dict, *keys: str) -> str | None:
    m = r
    for k in keys:
        m = m.get(k, {}) if isinstance(m, dict) else {}
    m = m.get("memory") if isinstance(m, dict) else None
    if not m:
        return None
    if m["kind"] == "cuda_max_allocated":
        return f"{m['peak_mib']:.0f}"
    return f"{m['peak_mib']:.0f} (+{max(m['growth_mib'], 0):.0f})"


def print_table(results: dict) -> list[dict]:
    cols = list(results)
    rows = rows_for(results)
    width = max(len(lbl) for lbl, _, _ in rows) + 2
    table = []
    header = f"{'measure':<{width}}{'unit':<10}" + "".join(f"{c:>16}" for c in cols)
    print(header)
    print("-" * len(header))
    for label, unit, get in rows:
        vals = [get(results[c]) for c in cols]
        print(f"{label:<{width}}{unit:<10}" + "".join(f"{fmt(v):>16}" for v in vals))
        table.append({"measure": label, "unit": unit, **{c: v for c, v in zip(cols, vals)}})
    return table


def scaling_lines(results: dict) -> list[str]:
    out = []
    for col, r in results.items():
        rec = r["recon"]
        full, half = rec["one_slice"], rec["one_slice_half"]
        steps_full, steps_half = full["pix2pix_calls"], half["pix2pix_calls"]
        sr = steps_full / max(steps_half, 1)

        def grow(a: float, b: float) -> str:
            if max(a, b) < 0.01:
                return f"{fmt(a)} vs {fmt(b)} s (negligible)"
            q = a / b if b > 0 else float("nan")
            kind = "grows with the slices" if q >= 1 + 0.5 * (sr - 1) else "constant" if q <= 1 + 0.25 * (sr - 1) else "in between: noisy?"
            return f"x{q:.2f} ({kind})"

        out.append(
            f"[{col}] {full['slices']} vs {half['slices']} slices ({steps_full} vs {steps_half} generation steps, x{sr:.2f}): "
            f"generation {fmt(full['generation_s'])} vs {fmt(half['generation_s'])} s {grow(full['generation_s'], half['generation_s'])}; "
            f"pix2pix calls {grow(full['pix2pix_s'], half['pix2pix_s'])}; prior slices {grow(full['prior_slices_s'], half['prior_slices_s'])}; "
            f"prior fit {fmt(full['prior_fit_s'])} vs {fmt(half['prior_fit_s'])} s {grow(full['prior_fit_s'], half['prior_fit_s'])}; "
            f"localization: one network call and one atlas match per input slice, independent of the volume's length ({fmt(rec['localization_s'])} s)"
        )
    return out


TARGETS = {"one_slice_s": 1.5, "one_slice_stretch_s": 1.0, "one_slice_rollout_ratio": 7.0, "every8_s": 5.0, "generation_ratio": 1.5,
           "peak_rss_gib": 2.0, "prior_cache_s": 600.0}


def summary_of(r: dict) -> tuple[dict, str]:
    """The JSON summary (stable keys, see the script's docstring) of one column, and its note."""
    rec = r["recon"]
    roll = rec["pix2pix_iterative"]["total_s"]
    cache = rec["prior_cache"]
    summary = {
        "one_slice_s": rec["one_slice"]["total_with_localization_s"],
        "rollout_s": roll,
        "every8_s": rec["every_8th"]["total_s"],
        "generation_ratio": rec["one_slice"]["generation_s"] / roll if roll > 0 else None,
        "peak_rss_gib": rec["peak_rss_mib"] / 1024.0 if rec.get("peak_rss_mib") is not None else None,
        "prior_cache_s": cache["scaled_120_s"],
    }
    note = (f"column {r['device']} {r['size']}px; prior_cache_s measured on {cache['volumes']} training volume(s) x {cache['positions']} "
            f"positions ({cache['seconds']:.1f} s, {cache['per_fit_s']:.3f} s per fit) and scaled to 120 volumes; "
            f"peak_rss_gib: a one-slice reconstruction in a fresh process; load average {r.get('load_average_1min')}")
    return summary, note


def print_verdicts(results: dict, meta: dict) -> tuple[list, list, dict, str]:
    """The batching check, scaling lines and the targets (PASS/FAIL with ratios); returns (checks, targets, summary, notes)."""
    checks, targets = [], []
    for col, r in results.items():
        bs = r["recon"]["batch_sizes"]
        ok = bs["pix2pix"] == [2] and bs["cell"] == [2]
        checks.append({"column": col, "check": "one-slice reconstruction batches both directions", "batch_sizes": bs, "pass": ok})
        print(f"CHECK {'PASS' if ok else 'FAIL'} [{col}] one-slice reconstruction batches both directions together: "
              f"batch sizes of {r['recon']['batch_calls']['pix2pix']} pix2pix calls {bs['pix2pix']}, "
              f"of {r['recon']['batch_calls']['cell']} cell calls {bs['cell']} (expected [2])")
    for line in scaling_lines(results):
        print("SCALING " + line)
    print("SCALING summary: generation (cell steps, pix2pix calls, prior slices) grows linearly with the slices generated "
          "(per direction, both directions in one batch); prior fitting (once per input slice) and localization "
          "(once per input slice) do not depend on the volume's length; with every 8th slice given, the fits grow with the inputs.")
    col = "cpu 128px" if "cpu 128px" in results else next((c for c in results if c.startswith("cpu")), None)
    if col is None:
        return checks, targets, {}, "no CPU column measured"
    summary, notes = summary_of(results[col])
    roll = summary["rollout_s"]

    def verdict(name: str, value: float | None, limit: float, text: str) -> None:
        ok = value is not None and value <= limit
        targets.append({"target": name, "column": col, "value": value, "limit": limit, "pass": ok})
        print(f"TARGET {'PASS' if ok else 'FAIL'} [{col}]: {text}")

    t = summary["one_slice_s"]
    verdict("one_slice_s", t, TARGETS["one_slice_s"], f"one slice -> whole volume {fmt(t)} s (target <= 1.5 s; {fmt(t / 1.5)} x the target; "
            f"{fmt(t / roll)} x the pix2pix rollout of {fmt(roll)} s)")
    verdict("one_slice_stretch_s", t, TARGETS["one_slice_stretch_s"], f"stretch: one slice {fmt(t)} s <= 1.0 s")
    verdict("one_slice_rollout_ratio", t / roll, TARGETS["one_slice_rollout_ratio"], f"one slice / pix2pix rollout = {fmt(t / roll)} (target <= 7)")
    e8 = summary["every8_s"]
    verdict("every8_s", e8, TARGETS["every8_s"], f"every 8th slice given: {fmt(e8)} s (target <= 5 s; {fmt(e8 / roll)} x the rollout)")
    g = summary["generation_ratio"]
    verdict("generation_ratio", g, TARGETS["generation_ratio"], f"MRNGAN generation / pix2pix rollout = {fmt(g)} (target <= 1.5)")
    m = summary["peak_rss_gib"]
    verdict("peak_rss_gib", m, TARGETS["peak_rss_gib"], f"peak RSS of a reconstruction {fmt(m)} GiB (target <= 2 GiB)")
    c = summary["prior_cache_s"]
    verdict("prior_cache_s", c, TARGETS["prior_cache_s"], f"fitted priors for 120 volumes x 9 positions: {fmt(c)} s "
            f"(target <= 600 s; {fmt(c / 600)} x the target; scaled from a subset)")
    print(f"SUMMARY {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()})}")
    print(f"NOTE: load average before {meta['load_average_before']}, after {meta['load_average_after']} "
          f"({meta['cpu_cores']} cores): other processes running at the same time slow every figure down; {meta['seconds']} s in all")
    return checks, targets, summary, notes

