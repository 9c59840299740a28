"""Tables, JSON, CSV and plots of a TransferabilityResult."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .transferability import TransferabilityResult


def _json_safe(x):
    """Strict JSON has no inf/nan: they are written as the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def format_table(result: TransferabilityResult) -> str:
    """Group | D(r,B) | D(A,B) | T, then the overall; the classifier row is marked."""
    width = max([len("group"), *map(len, result.groups)])
    lines = [f"{'group':<{width}}  {'D(r,B)':>12}  {'D(A,B)':>12}  {'T':>10}"]
    for g, dr, da, t in zip(result.groups, result.d_random, result.d_pretrained, result.values):
        mark = "  (classifier, not in overall)" if g == result.classifier else ""
        lines.append(f"{g:<{width}}  {dr:>12.6g}  {da:>12.6g}  {t:>10.4f}{mark}")
    lines.append(f"{'overall':<{width}}  {'':>12}  {'':>12}  {result.overall:>10.4f}")
    lines.append(f"metric {result.metric}, preset {result.preset}")
    for name, why in result.excluded.items():
        lines.append(f"excluded {name}: {why}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def write_json(result: TransferabilityResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(_json_safe(result.to_dict()), indent=2) + "\n")


def write_csv(result: TransferabilityResult, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "d_random", "d_pretrained", "T", "in_overall"])
        for g, dr, da, t in zip(result.groups, result.d_random, result.d_pretrained,
                                result.values):
            w.writerow([g, repr(dr), repr(da), repr(t), int(g != result.classifier)])
        w.writerow(["overall", "", "", repr(result.overall), ""])


def plot(result: TransferabilityResult, path: str | Path, title: str | None = None) -> None:
    """T per group in network order, the overall as a dashed line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n + 2), 4.0), layout="constrained")
    colors = ["0.6" if g == result.classifier else "tab:blue" for g in result.groups]
    finite = [v if math.isfinite(v) else 0.0 for v in result.values]
    ax.bar(range(n), finite, color=colors)
    ax.plot(range(n), finite, color="tab:blue", marker="o", lw=1)
    ax.axhline(result.overall, color="tab:red", ls="--", label=f"overall {result.overall:.3g}")
    ax.axhline(1.0, color="0.3", lw=0.8, ls=":", label="T = 1 (no benefit)")
    ax.set_xticks(range(n), result.groups, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"T = D(r,B) / D(A,B)   [{result.metric}]")
    ax.set_title(title or f"Layer-wise transferability ({result.preset} preset)")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
