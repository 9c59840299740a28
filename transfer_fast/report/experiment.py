"""report.md (and one self-contained report.html) of an experiment, with its figures.

The report is built once as a list of blocks (headings, paragraphs, tables, figures)
and rendered to Markdown and, on request, to HTML with the PNGs embedded, so both
always say the same. The findings section checks the paper's three claims on the
measured numbers and says plainly whether each holds here.
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import math
import statistics
from pathlib import Path

from ..errors import TransferFastError
from ..io.files import write_json, write_text
from ..measure.regression import fit_transferability_model
from .figures import (
    gap_and_amount_figure,
    layerwise_figure,
    model_fit_figure,
    save_figure,
    trajectories_figure,
)


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (ranks without ties correction: the values are continuous)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r
    if len(a) < 3 or not all(math.isfinite(v) for v in [*a, *b]):
        return math.nan
    try:
        return statistics.correlation(ranks(a), ranks(b))
    except statistics.StatisticsError:  # a constant input has no correlation
        return math.nan


def _ok(runs):
    return [r for r in runs if r["status"] == "done" and math.isfinite(r.get("T", math.nan))
            and r["T"] > 0]


def _figures(result, fig_dir: Path) -> dict[str, Path]:
    """The report's PNGs from the measured runs: per task and data amount, the mean T per
    layer group; T against G and N; every run's overall T per epoch."""
    runs, tasks = _ok(result.runs), list(result.tasks)
    amounts = sorted({r["N"] for r in runs})
    body = [g for g in result.groups if g != result.classifier]

    def rows(task, n=None):
        return [r for r in runs if r["task"] == task and (n is None or r["N"] == n)]

    layerwise = {t: {n: [_mean([r["T_groups"].get(g, math.nan) for r in rows(t, n)])
                         for g in body] for n in amounts if rows(t, n)} for t in tasks}
    points = {t: [(r["G"], r["T"], r["N"]) for r in rows(t)] for t in tasks}
    means = {t: [_mean([r["T"] for r in rows(t, n)]) for n in amounts] for t in tasks}
    curves = []
    for r in runs:
        path = Path(r["trajectory"]).with_suffix(".json") if r.get("trajectory") else None
        if path and path.exists():
            traj = json.loads(path.read_text())
            curves.append((r["task"], traj["epochs"], [float(v) for v in traj["overall"]]))
    return {"layerwise": save_figure(layerwise_figure(body, amounts, layerwise),
                                     fig_dir / "layerwise_T.png"),
            "t_vs_g_n": save_figure(gap_and_amount_figure(amounts, points, means),
                                    fig_dir / "T_vs_G_and_N.png"),
            "trajectories": save_figure(trajectories_figure(tasks, curves),
                                        fig_dir / "trajectories.png")}


def _verdict(holds: bool, fitted, term: str) -> str:
    if not holds:
        return "does not hold"
    if fitted and abs(fitted.coefficients[term]) < 2 * fitted.stderr[term]:
        return "holds only weakly (its coefficient is within two standard errors of zero)"
    return "holds"


def _fitted_term(fitted, term: str) -> str:
    if not fitted:
        return "not fitted"
    return f"{fitted.coefficients[term]:+.3f} (SE {fitted.stderr[term]:.3f})"


def _findings(result, fitted) -> list[str]:
    """The paper's three claims (PAPER.md section 3), each with its numbers; a claim the
    grid cannot test (too few tasks or data amounts) is said to be untestable."""
    runs = _ok(result.runs)
    tasks = [t for t in result.tasks if any(r["task"] == t for r in runs)]
    coef = fitted.coefficients if fitted else {}
    out = []
    claim = "**Larger gap -> lower T:"
    if len(tasks) < 3:
        out.append(f"{claim} cannot be tested here** (measured tasks: {len(tasks)}, need 3).")
    else:
        rho = _rank_correlation([result.tasks[t]["G"] for t in tasks],
                                [_mean([r["T"] for r in runs if r["task"] == t]) for t in tasks])
        holds = rho < 0 and coef.get("G", -1) < 0
        out.append(f"{claim} {_verdict(holds, fitted, 'G')} here.** Rank correlation of the "
                   f"task's G with its mean T: {rho:+.2f} over {len(tasks)} tasks; regression "
                   f"coefficient of G: {_fitted_term(fitted, 'G')}.")
    amounts = sorted({r["N"] for r in runs})
    claim = "**More data -> lower T:"
    if len(amounts) < 2:
        out.append(f"{claim} cannot be tested here** (one data amount).")
    else:
        def mean_t(task, n):
            return _mean([r["T"] for r in runs if r["task"] == task and r["N"] == n])
        lower = [t for t in tasks if mean_t(t, amounts[-1]) < mean_t(t, amounts[0])]
        holds = len(lower) > len(tasks) / 2 and coef.get("logN", -1) < 0
        out.append(f"{claim} {_verdict(holds, fitted, 'logN')} here.** T at N={amounts[-1]} "
                   f"is below T at N={amounts[0]} for {len(lower)} of {len(tasks)} tasks; "
                   f"regression coefficient of log N: {_fitted_term(fitted, 'logN')}.")
    if coef:  # z-scored predictors: the magnitudes compare directly
        big = abs(coef["logN"]) >= abs(coef["G"]) or abs(coef["D"]) >= abs(coef["G"])
        out.append(f"Data amount and diversity {'matter' if big else 'do not matter'} at "
                   f"least as much as the gap here (the paper's second finding): |log N| "
                   f"{abs(coef['logN']):.3f}, |D| {abs(coef['D']):.3f} against |G| "
                   f"{abs(coef['G']):.3f}, z-scored coefficients.")
    body = [g for g in result.groups if g != result.classifier]
    if len(body) < 2:
        out.append("**The first layer is not the most transferable: cannot be tested here** "
                   "(fewer than two layer groups).")
        return out
    ranks = [sorted(body, key=lambda g: -r["T_groups"].get(g, -math.inf)).index(body[0]) + 1
             for r in runs]
    stem_top = ranks.count(1)
    depth = [_rank_correlation(list(range(len(body))), [r["T_groups"].get(g, math.nan)
                                                         for g in body]) for r in runs]
    decreasing = sum(1 for d in depth if d < -0.5)
    out.append(f"**The first layer is not the most transferable: "
               f"{'holds' if stem_top < len(runs) / 2 else 'does not hold'} here.** The stem "
               f"({body[0]}) has the highest T in {stem_top} of {len(runs)} runs; its mean "
               f"rank is {_mean([float(x) for x in ranks]):.1f} of {len(body)} groups. T falls "
               f"steadily from input to output (rank correlation with depth below -0.5) in "
               f"{decreasing} of {len(runs)} runs.")
    return out


def _blocks(result, cfg, fitted, figures, notes) -> list[tuple]:
    e = cfg["experiment"]
    runs, failed = _ok(result.runs), [r for r in result.runs if r["status"] != "done"]
    blocks = [("h1", f"Transferability study: {e['name']}"),
              ("p", f"Pre-trained on `{cfg['pretrain']['data']}` ({cfg['model']['arch']}), "
                    f"fine-tuned on {len(result.tasks)} tasks x data amounts "
                    f"{e['data_amounts']} x seeds {e['seeds']}: {len(result.runs)} runs, "
                    f"{len(runs)} measured, {len(failed)} failed. T = D(θr, θB) / D(θA, θB) "
                    f"per layer group ({e['metric']}), overall = mean over groups without the "
                    "classifier. G: BN-statistics gap of the pre-trained network on the task's "
                    "training pool; D: intraclass variance of its penultimate features; "
                    "N: training images of the run."),
              ("h2", "Findings"), *[("p", f) for f in _findings(result, fitted)],
              ("h2", "Layer-wise T per task"), ("img", figures["layerwise"],
                                                 "T per layer group, one line per data amount"),
              ("h2", "T against G and N"), ("img", figures["t_vs_g_n"], "T against G and N")]
    if fitted:
        blocks += [("h2", "Explanatory model: log T = a G + b D + c log N + d (z-scored)"),
                   ("table", ["term", "coefficient", "std. error"],
                    [[k, f"{fitted.coefficients[k]:+.4f}", f"{fitted.stderr[k]:.4f}"]
                     for k in fitted.coefficients]
                    + [["intercept", f"{fitted.intercept:+.4f}",
                        f"{fitted.stderr.get('intercept', math.nan):.4f}"]]),
                   ("p", f"R² = {fitted.r2:.3f}, leave-one-out R² = {fitted.loo_r2:.3f}, "
                         f"{len(fitted.measured)} runs."),
                   ("img", figures["fit"], "predicted against measured T")]
    blocks += [("h2", "Trajectories"), ("img", figures["trajectories"],
                                        "overall T after every fine-tuning epoch")]
    blocks += [("h2", "Tasks"), ("table", ["task", "shift", "G (BN, " + e["gap_metric"] + ")",
                                           "G (Fréchet)", "D", "training pool"],
                                 [[t, v["shift"], f"{v['G']:.4g}", f"{v['G_frechet']:.4g}",
                                   f"{v['D']:.4g}", str(v["pool"])]
                                  for t, v in result.tasks.items()])]
    blocks += [("h2", "Runs"), ("table", ["run", "T", "G", "D", "N", "val acc", "status"],
                                [[r["run"], f"{r.get('T', math.nan):.4g}", f"{r['G']:.4g}",
                                  f"{r['D']:.4g}", str(r["N"]),
                                  f"{r['val_acc']:.3f}" if r["val_acc"] >= 0 else "-",
                                  r["status"] + (f": {r['reason']}" if r["reason"] else "")]
                                 for r in result.runs])]
    blocks += [("p", f"Note: {n}") for n in notes]
    return blocks


def _markdown(blocks, root: Path) -> str:
    lines = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "table":
            head, rows = rest
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        else:
            lines += [f"![{rest[1]}]({rest[0].relative_to(root).as_posix()})", ""]
    return "\n".join(lines)


def _html(blocks, title: str) -> str:
    def inline(text: str) -> str:  # the Markdown the blocks use: **bold** and `code`
        parts = html_lib.escape(text).split("**")
        text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
        parts = text.split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{inline(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{inline(rest[0])}</p>")
        elif kind == "table":
            head, rows = rest
            body.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row)
                                  + "</tr>" for row in rows) + "</table>")
        else:
            data = base64.b64encode(rest[0].read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="'
                        f'{html_lib.escape(rest[1])}"><figcaption>{inline(rest[1])}'
                        "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 8px;"
             "text-align:right}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html_lib.escape(title)}"
            f"</title><style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(result, cfg: dict, *, html: bool = False) -> None:
    """Figures under figures/, report.md, results.json, and report.html if asked."""
    fig_dir = result.out / "figures"
    runs = _ok(result.runs)
    notes = list(result.notes)
    fitted = None
    try:
        fitted = fit_transferability_model(
            [{"T": r["T"], "G": r["G"], "D": r["D"], "N": r["N"], "label": r["run"]}
             for r in runs])
        notes += fitted.warnings
    except TransferFastError as exc:
        notes.append(f"the explanatory model was not fitted: {exc}")
    result.model = fitted
    figures = _figures(result, fig_dir)
    if fitted:
        figures["fit"] = save_figure(model_fit_figure(fitted), fig_dir / "model_fit.png")
    blocks = _blocks(result, cfg, fitted, figures, notes)
    write_text(result.report, _markdown(blocks, result.out))
    if html:
        write_text(result.out / "report.html", _html(blocks, cfg["experiment"]["name"]))
    summary = {"runs": [{k: v for k, v in r.items() if k not in ("checkpoint", "trajectory")}
                        for r in result.runs],
               "tasks": result.tasks, "model": fitted.to_dict() if fitted else None}
    write_json(result.out / "results.json", summary)
