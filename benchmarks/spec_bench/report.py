"""Combine the spec_bench runs of run.sh into per-set tau-gamma plots and markdown tables.

    python benchmarks/spec_bench/report.py runs/spec_bench      # writes report.md and <set>/tau_gamma.png
"""

from __future__ import annotations

import glob
import json
import os
import sys

CURVES = ("eagle2", "c2t", "c2t_no_second_prune")
MERGE = {"c2t_high_beta": "c2t", "c2t_low_beta": "c2t", "eagle2_small": "eagle2", "eagle2_large": "eagle2"}  # extra sweep points run separately join their curve


def load(out: str) -> dict[str, dict[str, dict]]:
    runs: dict[str, dict[str, dict]] = {}
    for path in sorted(glob.glob(os.path.join(out, "*", "*", "summary.json"))):
        set_name, run = path.split(os.sep)[-3:-1]
        summary = json.load(open(path))
        entry = runs.setdefault(set_name, {}).setdefault(MERGE.get(run, run), {"rows": []})
        entry["rows"] = entry["rows"] + summary["rows"]
    return runs


def interpolate_gamma(curve: list[dict], tau: float, tolerance: float = 0.005) -> float | None:
    """EAGLE-2's gamma/step at ``tau`` by linear interpolation along its curve (None outside it; a
    ``tolerance`` past either end snaps to that end)."""
    pts = sorted((r["tau"], r["gamma_per_step"]) for r in curve)
    if not pts:
        return None
    if pts[0][0] - tolerance <= tau < pts[0][0]:
        return pts[0][1]
    if pts[-1][0] < tau <= pts[-1][0] + tolerance:
        return pts[-1][1]
    for (t0, g0), (t1, g1) in zip(pts, pts[1:]):
        if t0 <= tau <= t1:
            return g0 if t1 == t0 else g0 + (g1 - g0) * (tau - t0) / (t1 - t0)
    return None


def matched_tau_rows(set_name: str, runs: dict) -> list[str]:
    rows = []
    eagle = runs.get("eagle2", {}).get("rows", [])
    for curve in ("c2t", "c2t_no_second_prune"):
        for r in runs.get(curve, {}).get("rows", []):
            g = interpolate_gamma(eagle, r["tau"])
            ratio = f"{r['gamma_per_step'] / g:.2f}" if g else "τ outside EAGLE-2's range"
            rows.append(f"| {set_name} | {curve} {r['setting']} | {r['tau']:.3f} | {r['gamma_per_step']:.1f} | "
                        f"{'—' if g is None else f'{g:.1f}'} | {ratio} |")
    return rows


def best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def wall_clock_row(set_name: str, runs: dict) -> str:
    base = {r["strategy"]: r for r in runs.get("baselines", {}).get("rows", [])}
    ar = base.get("ar", {}).get("tokens_per_s")
    cells = [set_name, f"{ar:.2f}" if ar else "—"]
    for r in (base.get("prompt_lookup"), best(runs.get("eagle2", {}).get("rows", [])),
              best(runs.get("c2t", {}).get("rows", []))):
        if r is None:
            cells.append("—")
        else:
            setting = f" {r['setting']}" if r.get("setting") else ""
            cells.append(f"{r['tokens_per_s']:.2f} ({r['tokens_per_s'] / ar:.2f}x){setting}" if ar else
                         f"{r['tokens_per_s']:.2f}")
    return "| " + " | ".join(cells) + " |"


def plot(set_name: str, runs: dict, path: str) -> None:
    from c2t_fast.bench import plot_tau_gamma

    curves = {c: [(r["gamma_per_step"], r["tau"]) for r in runs.get(c, {}).get("rows", [])] for c in CURVES}
    plot_tau_gamma(curves, path, f"{set_name}: τ–γ (SmolLM2-135M, shipped head)", styles=dict(zip(CURVES, ("o-", "s-", "^--"))))


def main(out: str) -> str:
    runs = load(out)
    lines = ["### Matched τ: γ of C2T vs EAGLE-2 (interpolated on EAGLE-2's curve)", "",
             "| set | C2T setting | τ | γ/step | EAGLE-2 γ/step at that τ | γ ratio C2T/EAGLE-2 |",
             "|---|---|---|---|---|---|"]
    for set_name, r in runs.items():
        lines += matched_tau_rows(set_name, r)
        plot(set_name, r, os.path.join(out, set_name, "tau_gamma.png"))
    lines += ["", "### Wall clock (tokens/s; ratio vs plain decoding)", "",
              "| set | plain decoding | prompt lookup (HF) | EAGLE-2 best | C2T best |", "|---|---|---|---|---|"]
    lines += [wall_clock_row(s, r) for s, r in runs.items()]
    curves = ["### All runs", "", "| set | run | strategy | setting | τ | accept len | γ/step | tokens/s | vs AR |",
              "|---|---|---|---|---|---|---|---|---|"]
    for set_name, rs in runs.items():
        for run, summary in rs.items():
            for r in summary["rows"]:
                f = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
                curves.append(f"| {set_name} | {run} | {r['strategy']} | {r['setting'] or ''} | {f(r['tau'], '.3f')} | "
                              f"{f(r['accept_length'], '.3f')} | {f(r['gamma_per_step'], '.1f')} | "
                              f"{r['tokens_per_s']:.2f} | {f(r.get('speedup_vs_ar'), '.2f')} |")
    text = "\n".join(lines + [""] + curves) + "\n"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/spec_bench")
