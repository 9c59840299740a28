"""A TransferabilityResult as a text table, JSON and CSV (files written through io.files)."""

from __future__ import annotations

from pathlib import Path

from ..io.files import write_csv, write_json
from ..measure.transferability import TransferabilityResult

CSV_COLUMNS = ("group", "d_random", "d_pretrained", "T", "in_overall")


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


def write_result_json(result: TransferabilityResult, path: str | Path) -> Path:
    """`result.to_dict()` as strict JSON (inf/nan as strings)."""
    return write_json(path, result.to_dict())


def write_result_csv(result: TransferabilityResult, path: str | Path) -> Path:
    """One row per group (floats in full precision), then the overall."""
    rows = [[g, repr(dr), repr(da), repr(t), int(g != result.classifier)]
            for g, dr, da, t in zip(result.groups, result.d_random, result.d_pretrained,
                                    result.values)]
    return write_csv(path, CSV_COLUMNS, [*rows, ["overall", "", "", repr(result.overall), ""]])
