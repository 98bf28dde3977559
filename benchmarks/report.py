"""Turn a pytest-benchmark JSON file into the markdown table of BENCHMARKS.md.

Usage: python benchmarks/report.py bench.json
One row per benchmark group: the median of every implementation and the reference/kernel ratio.
"""

import json
import platform
import sys
from collections import defaultdict


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
    impls = sorted({i for g in groups.values() for i in g}, key=lambda s: (s != "kernel", s))
    print("| op | " + " | ".join(f"{i} (µs)" for i in impls) + " | reference / kernel |")
    print("|---|" + "---|" * len(impls) + "---|")
    for name, row in groups.items():
        cells = [f"{row[i] * 1e6:.1f}" if i in row else "" for i in impls]
        ratio = f"{row['reference'] / row['kernel']:.1f}x" if "kernel" in row and "reference" in row else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
