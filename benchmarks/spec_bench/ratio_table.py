"""The side-by-side table the spec_bench scripts print: each row's tokens/s relative to plain decoding and
to prompt lookup measured in the same run, with tau, verified tokens and plain steps per step."""

from __future__ import annotations

HEADER = ["| set | row | tokens/s | vs plain | vs prompt lookup | tau | verified/step | plain steps |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]


def ratio_lines(set_name: str, rows: dict) -> list[str]:
    """Adds ``vs_plain`` / ``vs_prompt_lookup`` to every row of ``rows`` (label -> dict with ``tokens_per_s``;
    ``plain`` and ``prompt lookup`` among them) and returns the table's lines for the set."""
    ar, pl = rows["plain"]["tokens_per_s"], rows["prompt lookup"]["tokens_per_s"]
    lines = []
    nan = float("nan")
    for label, r in rows.items():
        r.update(vs_plain=r["tokens_per_s"] / ar, vs_prompt_lookup=r["tokens_per_s"] / pl)
        lines.append(f"| {set_name} | {label} | {r['tokens_per_s']:.1f} | {r['vs_plain']:.2f} | "
                     f"{r['vs_prompt_lookup']:.2f} | {r.get('tau', nan):.2f} | {r.get('verified_per_step', nan):.1f} | "
                     f"{r.get('plain_share', nan):.0%} |")
    return lines
