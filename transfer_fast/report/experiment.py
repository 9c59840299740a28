"""report.md (and one self-contained report.html) of an experiment, with its figures.

Rendering only: the pipeline measured, fitted and ranked everything (an ExperimentResult);
this module draws the figures and words the numbers. The report is built once as a list
of blocks (headings, paragraphs, tables, figures) and rendered to Markdown and, on
request, to HTML with the PNGs embedded, so both always say the same. The findings
section judges the paper's claims from confidence intervals, says "not judged" when the
model is too weak to judge anything, and "cannot be tested" when the grid is too small.
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import math
from pathlib import Path

from ..io.files import write_json, write_text
from ..measure.regression import MIN_DF
from .figures import model_fit_figure, save_figure
from .findings import (
    agreement_sentence,
    body_groups,
    findings,
    finite_mean,
    measured_runs,
)
from .study_figures import (
    SCORE_NAMES,
    gap_and_amount_figure,
    layerwise_figure,
    scores_vs_t_figure,
    trajectories_figure,
)


def _num(v: float, fmt: str = ".4g") -> str:
    return format(v, fmt) if math.isfinite(v) else "-"


def _figures(result, fig_dir: Path) -> dict[str, Path]:
    """The report's PNGs: per task and data amount, the mean T per layer group; T against
    G and N; every run's overall T per epoch; the fit; each score against mean T."""
    runs, tasks = measured_runs(result.runs), list(result.tasks)
    amounts = sorted({r.N for r in runs})
    body = body_groups(result)

    def rows(task, n=None):
        return [r for r in runs if r.task == task and (n is None or r.N == n)]

    layerwise = {t: {n: [finite_mean([r.T_groups.get(g, math.nan) for r in rows(t, n)])
                         for g in body] for n in amounts if rows(t, n)} for t in tasks}
    points = {t: [(r.G, r.T, r.N) for r in rows(t)] for t in tasks}
    means = {t: [finite_mean([r.T for r in rows(t, n)]) for n in amounts] for t in tasks}
    curves = []
    for r in runs:
        path = Path(r.trajectory).with_suffix(".json") if r.trajectory else None
        if path and path.exists():
            traj = json.loads(path.read_text())
            curves.append((r.task, traj["epochs"], [float(v) for v in traj["overall"]]))
    figures = {"layerwise": save_figure(layerwise_figure(body, amounts, layerwise),
                                        fig_dir / "layerwise_T.png"),
               "t_vs_g_n": save_figure(gap_and_amount_figure(amounts, points, means),
                                       fig_dir / "T_vs_G_and_N.png"),
               "trajectories": save_figure(trajectories_figure(tasks, curves),
                                           fig_dir / "trajectories.png")}
    if result.model:
        figures["fit"] = save_figure(model_fit_figure(result.model), fig_dir / "model_fit.png")
    names = _score_names(result)
    if names:
        measured = [t for t in result.tasks.values() if t.measured]
        taus = {a.score: a.tau_T for a in result.agreements}
        figures["scores"] = save_figure(
            scores_vs_t_figure([t.name for t in measured], [t.mean_T for t in measured],
                               {k: [t.scores.get(k, math.nan) for t in measured]
                                for k in names}, taus),
            fig_dir / "scores_vs_T.png")
    return figures


def _score_names(result) -> list[str]:
    return [a.score for a in result.agreements if not a.baseline
            and any(math.isfinite(t.scores.get(a.score, math.nan))
                    for t in result.tasks.values() if t.measured)]


# ---- the scores ----------------------------------------------------------------------------

def _interval(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if all(map(math.isfinite, ci)) else "-"


def _score_blocks(result, figures) -> list[tuple]:
    names = _score_names(result)
    if not result.agreements:
        return []
    shown = [a for a in result.agreements if a.baseline or a.score in names]
    measured = [t for t in result.tasks.values() if t.measured]
    blocks = [("h2", "Scores against measured T and accuracy"),
              ("p", "Each score is computed once per task, from one pass of the pre-trained "
                    "network over the task's training pool (penultimate features; NCE and LEEP "
                    "from the pre-trained head's predictions over the pre-training classes). "
                    "It is ranked against the task's mean T and mean fine-tuned validation "
                    "accuracy over its measured runs. Static baselines: -G (the first "
                    "consensus: a smaller gap, a more transferable task) and -classes (fewer "
                    "classes, an easier task; the pool size is no baseline here, since every "
                    "task is fine-tuned on the same data amounts drawn from it)."),
              ("table", ["score", "tau vs T", "weighted tau vs T", "tau vs accuracy",
                         "weighted tau vs accuracy", "tasks"],
               [[(a.score + " (baseline)") if a.baseline else SCORE_NAMES.get(a.score, a.score),
                 _num(a.tau_T, "+.3f"), _num(a.weighted_tau_T, "+.3f"),
                 _num(a.tau_acc, "+.3f"), _num(a.weighted_tau_acc, "+.3f"), str(a.tasks)]
                for a in shown]),
              ("p", agreement_sentence(result)),
              ("h2", "Scores per task"),
              ("table", ["task", "mean T", "mean val acc", "runs",
                         *(SCORE_NAMES.get(k, k) for k in names), "G", "classes"],
               [[t.name, _num(t.mean_T), _num(t.mean_acc, ".3f"), str(t.measured),
                 *(_num(t.scores.get(k, math.nan)) for k in names), _num(t.G),
                 str(t.classes)] for t in measured])]
    if "scores" in figures:
        blocks.append(("img", figures["scores"], "each score against the task's mean T"))
    return blocks


# ---- the report ----------------------------------------------------------------------------

def _model_blocks(result, figures) -> list[tuple]:
    m = result.model
    if not m:
        return []
    terms = ["G", "D", "logN", "intercept"]
    value = {**m.coefficients, "intercept": m.intercept}
    shown = m.cluster_df >= MIN_DF  # below, clustered errors can be 0 by construction
    ci = {t: m.ci.get(t, (math.nan, math.nan)) if shown else (math.nan, math.nan)
          for t in terms}
    clustered = (f"the errors clustered by task (CR1, {m.cluster_df} degrees of freedom) and "
                 f"the percentile intervals from {m.bootstrap_used} of {m.bootstrap} resamples "
                 "of the tasks (the others could not separate the predictors) are the ones "
                 "to read." if shown else
                 f"errors clustered by task would have {m.cluster_df} degrees of freedom, "
                 f"fewer than {MIN_DF}: with so few tasks they, and the task-bootstrap "
                 "intervals, are degenerate and not shown.")
    return [("h2", "Explanatory model: log T = a G + b D + c log N + d (z-scored)"),
            ("table", ["term", "coefficient", "SE (runs independent)", "SE (clustered by task)",
                       "95% CI (task bootstrap)"],
             [[t, f"{value[t]:+.4f}", f"{m.stderr[t]:.4f}",
               _num(m.cluster_stderr[t] if shown else math.nan, ".4f"),
               _interval(ci[t])] for t in terms]),
            ("p", f"R² = {m.r2:.3f}, leave-one-out R² = {m.loo_r2:.3f}, {len(m.measured)} runs "
                  f"in {m.clusters} tasks. The first standard errors treat the runs as "
                  f"independent ({m.df_resid} residual degrees of freedom); G and D take one "
                  f"value per task, so {clustered}"),
            ("img", figures["fit"], "predicted against measured T")]


def _blocks(result, cfg, figures) -> list[tuple]:
    e = cfg["experiment"]
    runs, failed = measured_runs(result.runs), [r for r in result.runs if r.status != "done"]
    blocks = [("h1", f"Transferability study: {e['name']}"),
              ("p", f"Pre-trained on `{cfg['pretrain']['data']}` ({cfg['model']['arch']}), "
                    f"fine-tuned on {len(result.tasks)} tasks x data amounts "
                    f"{e['data_amounts']} x seeds {e['seeds']}: {len(result.runs)} runs, "
                    f"{len(runs)} measured, {len(failed)} failed. T = D(θr, θB) / D(θA, θB) "
                    f"per layer group ({e['metric']}), overall = mean over groups without the "
                    "classifier. G: BN-statistics gap of the pre-trained network on the task's "
                    "training pool; D: intraclass variance of its penultimate features; "
                    "N: training images of the run."),
              ("h2", "Findings"), *[("p", f) for f in findings(result)],
              ("h2", "Layer-wise T per task"), ("img", figures["layerwise"],
                                                 "T per layer group, one line per data amount"),
              ("h2", "T against G and N"), ("img", figures["t_vs_g_n"], "T against G and N")]
    blocks += _model_blocks(result, figures)
    blocks += _score_blocks(result, figures)
    blocks += [("h2", "Trajectories"), ("img", figures["trajectories"],
                                        "overall T after every fine-tuning epoch")]
    blocks += [("h2", "Tasks"), ("table", ["task", "shift", "G (BN, " + e["gap_metric"] + ")",
                                           "G (Fréchet)", "D", "classes", "training pool"],
                                 [[t.name, t.shift, f"{t.G:.4g}", f"{t.G_frechet:.4g}",
                                   f"{t.D:.4g}", str(t.classes), str(t.pool)]
                                  for t in result.tasks.values()])]
    blocks += [("h2", "Runs"), ("table", ["run", "T", "G", "D", "N", "val acc", "status"],
                                [[r.run, _num(r.T), f"{r.G:.4g}", f"{r.D:.4g}", str(r.N),
                                  f"{r.val_acc:.3f}" if r.val_acc >= 0 else "-",
                                  r.status + (f": {r.reason}" if r.reason else "")]
                                 for r in result.runs])]
    blocks += [("p", f"Note: {n}") for n in result.notes]
    p = result.provenance
    if p:
        blocks += [("h2", "Provenance"),
                   ("table", ["what", "value"], [["transfer_fast", p.package], ["torch", p.torch],
                                        ["python", p.python], ["date (UTC)", p.date],
                                        ["command", f"`{p.command}`"],
                                        ["config hash (sha256, 12 hex)", p.config_hash]])]
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
    figures = _figures(result, result.out / "figures")
    blocks = _blocks(result, cfg, figures)
    write_text(result.report, _markdown(blocks, result.out))
    if html:
        write_text(result.out / "report.html", _html(blocks, cfg["experiment"]["name"]))
    write_json(result.out / "results.json", result.to_dict())
