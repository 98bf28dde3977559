"""Turn a pytest-benchmark JSON file into the markdown table of BENCHMARKS.md.

Usage: python benchmarks/report.py bench.json
One row per benchmark group: the median of every implementation and the reference/kernel ratio.
"""

import json
import platform
import sys
from collections import defaultdict


def tree_size_table(data: dict) -> None:
    """Benchmarks parametrised by tree size ``T`` and ``impl``: milliseconds per T and implementation, and
    each implementation's cost relative to its own T = 1 and to the first implementation's T = 1."""
    rows: dict[int, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        p = b["params"] or {}
        if "T" in p and "impl" in p:
            rows[p["T"]][p["impl"]] = b["stats"]["median"]
    if 1 not in rows:
        return
    impls = list(dict.fromkeys(i for r in rows.values() for i in r))
    base = rows[1]
    print("\n| T | " + " | ".join(f"{i} ms | {i} vs its T=1" for i in impls) + f" | {impls[-1]} T=1 / {impls[0]} |")
    print("|---|" + "---|---|" * len(impls) + "---|")
    for T in sorted(rows):
        r = rows[T]
        cells = [f"{r[i] * 1e3:.1f} | {r[i] / base[i]:.2f}" if i in r and i in base else " | " for i in impls]
        ratio = f"{base[impls[-1]] / r[impls[0]]:.2f}x" if impls[0] in r and impls[-1] in base else ""
        print(f"| {T} | " + " | ".join(cells) + f" | {ratio} |")


def main(path: str) -> None:
    data = json.load(open(path))
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b["params"].get("impl", b["name"])
        groups[b["group"]][impl] = b["stats"]["median"]
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", platform.processor())
    print(f"Machine: {cpu}, {info.get('cpu', {}).get('count', '?')} logical cores; "
          f"python {info.get('python_version', '?')}; medians.\n")
    impls = list(dict.fromkeys(i for g in groups.values() for i in g))  # first-seen order
    ours = impls[0]  # each benchmark file lists our implementation first
    print("| benchmark | " + " | ".join(f"{i} (µs)" for i in impls) + " | speed-up of " + ours + " |")
    print("|---|" + "---|" * len(impls) + "---|")
    for name, row in groups.items():
        cells = [f"{row[i] * 1e6:.1f}" if i in row else "" for i in impls]
        ratios = ", ".join(f"{row[i] / row[ours]:.1f}x vs {i}" for i in impls[1:] if i in row and ours in row)
        print(f"| {name} | " + " | ".join(cells) + f" | {ratios} |")
    tree_size_table(data)


if __name__ == "__main__":
    main(sys.argv[1])
