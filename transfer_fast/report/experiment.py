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
import statistics
from pathlib import Path

from ..io.files import write_json, write_text
from ..measure.agreement import kendall_tau
from ..measure.regression import MIN_DF, interval_verdict
from .figures import model_fit_figure, save_figure
from .study_figures import (
    SCORE_NAMES,
    gap_and_amount_figure,
    layerwise_figure,
    scores_vs_t_figure,
    trajectories_figure,
)

MIN_TASKS = MIN_DF + 1  # G and D vary between tasks only: tasks - 1 degrees of freedom


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _num(v: float, fmt: str = ".4g") -> str:
    return format(v, fmt) if math.isfinite(v) else "-"


def _ok(runs):
    return [r for r in runs if r.measured]


def _body(result) -> list[str]:
    return [g for g in result.groups if g != result.classifier]


def _figures(result, fig_dir: Path) -> dict[str, Path]:
    """The report's PNGs: per task and data amount, the mean T per layer group; T against
    G and N; every run's overall T per epoch; the fit; each score against mean T."""
    runs, tasks = _ok(result.runs), list(result.tasks)
    amounts = sorted({r.N for r in runs})
    body = _body(result)

    def rows(task, n=None):
        return [r for r in runs if r.task == task and (n is None or r.N == n)]

    layerwise = {t: {n: [_mean([r.T_groups.get(g, math.nan) for r in rows(t, n)])
                         for g in body] for n in amounts if rows(t, n)} for t in tasks}
    points = {t: [(r.G, r.T, r.N) for r in rows(t)] for t in tasks}
    means = {t: [_mean([r.T for r in rows(t, n)]) for n in amounts] for t in tasks}
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


# ---- findings ----------------------------------------------------------------------------

def _model_problem(model) -> str | None:
    """Why the fit supports no finding (None when it does)."""
    if model is None:
        return "the explanatory model could not be fitted (see the notes)"
    if model.cluster_df < MIN_DF:
        if model.clusters - 1 < model.df_resid:
            return (f"its G and D take one value per task, and {model.clusters} tasks leave "
                    f"{model.cluster_df} degrees of freedom for their errors (at least "
                    f"{MIN_DF} are needed)")
        return (f"{len(model.measured)} runs for 4 parameters leave {model.df_resid} residual "
                f"degrees of freedom (at least {MIN_DF} are needed)")
    if not model.loo_r2 >= 0:
        return (f"its leave-one-out R² is {model.loo_r2:.2f}: it predicts a left-out run "
                "worse than the mean of the others does")
    return None


_SIDE = {-1: ("below", "above"), 1: ("above", "below")}


def _verdict(model, term: str, what: str, expected: int) -> str:
    """'supported here: the 95% CI of <what>, [lo, hi], lies below zero' and the like."""
    interval = model.ci.get(term, (math.nan, math.nan))
    return _interval_words(model.sign_verdict(term, expected), interval, what, expected)


def _interval_words(verdict: str, interval, what: str, expected: int) -> str:
    if verdict == "undetermined":
        return ("undetermined here: no confidence interval (too few task resamples could "
                "be fitted)")
    ci = f"the 95% CI of {what}, [{interval[0]:+.3f}, {interval[1]:+.3f}],"
    side, other = _SIDE[expected]
    return {"supported": f"supported here: {ci} lies {side} zero",
            "not supported": f"not supported here: {ci} includes zero",
            "contradicted": f"contradicted here: {ci} lies {other} zero"}[verdict]


def _coef(model, term: str) -> str:
    if model.cluster_df < MIN_DF:  # degenerate clustered errors are not quoted
        return f"{model.coefficients[term]:+.3f}"
    return (f"{model.coefficients[term]:+.3f} (clustered SE {model.cluster_stderr[term]:.3f}, "
            f"{model.cluster_df} df)")


def _interval(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if all(map(math.isfinite, ci)) else "-"


def _model_findings(result, tasks, amounts, problem) -> list[str]:
    """The claims that rest on the fitted model: the gap, the data amount, and the gap
    against data amount and diversity."""
    model, out = result.model, []
    gap_tau = next((a.tau_T for a in result.agreements if a.score == "-G"), math.nan)
    claim = "**A larger domain gap lowers T"
    if len(tasks) < MIN_TASKS:
        out.append(f"{claim}: cannot be tested here** ({len(tasks)} measured tasks: G takes "
                   f"one value per task, so its effect rests on tasks - 1 degrees of freedom; "
                   f"at least {MIN_TASKS} tasks are needed).")
    else:
        said = "not judged here** (see above)." if problem else \
            _verdict(model, "G", "G's coefficient", -1) + ".**"
        out.append(f"{claim}: {said} Kendall's tau of -G with the task's mean T: "
                   f"{gap_tau:+.2f} over {len(tasks)} tasks"
                   + (f"; coefficient of G {_coef(model, 'G')}." if model else "."))
    claim = "**More fine-tuning data lowers T"
    if len(amounts) < 2:
        out.append(f"{claim}: cannot be tested here** (one data amount).")
    else:
        runs = _ok(result.runs)

        def mean_t(task, n):
            return _mean([r.T for r in runs if r.task == task and r.N == n])
        lower = [t for t in tasks if mean_t(t, amounts[-1]) < mean_t(t, amounts[0])]
        said = "not judged here** (see above)." if problem else \
            _verdict(model, "logN", "log N's coefficient", -1) + ".**"
        out.append(f"{claim}: {said} Mean T at N={amounts[-1]} is below mean T at "
                   f"N={amounts[0]} for {len(lower)} of {len(tasks)} tasks"
                   + (f"; coefficient of log N {_coef(model, 'logN')}." if model else "."))
    claim = "**Data amount and diversity matter at least as much as the gap"
    if len(tasks) < MIN_TASKS or len(amounts) < 2:
        out.append(f"{claim}: cannot be tested here** (needs both claims above testable).")
    elif problem:
        out.append(f"{claim}: not judged here** (see above).")
    else:
        c = model.coefficients
        interval = model.draw_interval(lambda b: abs(b[:, 2:4]).max(axis=1) - abs(b[:, 1]))
        verdict = _interval_words(interval_verdict(interval, 1), interval,
                                  "max(|log N|, |D|) - |G|", 1)
        out.append(f"{claim}: {verdict}.** Z-scored coefficients: |log N| {abs(c['logN']):.3f}, "
                   f"|D| {abs(c['D']):.3f}, |G| {abs(c['G']):.3f}.")
    return out


def _layer_findings(result) -> list[str]:
    """The layer-wise claims, from each task's mean layer profile (not from the model):
    supported when they hold in most tasks, so they need MIN_TASKS tasks too."""
    runs, body = _ok(result.runs), _body(result)
    stem, peak = ("**The stem is among the least transferable layers",
                  "**Layer-wise T peaks in the middle of the network")
    tasks = {r.task for r in runs}
    if len(tasks) < MIN_TASKS:
        why = (f"cannot be tested here** ({len(tasks)} measured tasks; at least {MIN_TASKS} are "
               "needed to say what holds in most tasks).")
        return [f"{stem}: {why}", f"{peak}: {why}"]
    if len(body) < 2:
        return [f"{stem}: cannot be tested here** (fewer than two layer groups).",
                f"{peak}: cannot be tested here** (fewer than three layer groups)."]
    profiles = {t: [_mean([r.T_groups.get(g, math.nan) for r in runs if r.task == t])
                    for g in body] for t in result.tasks if any(r.task == t for r in runs)}
    k = len(profiles)
    low = [t for t, p in profiles.items() if p[0] <= statistics.median(p)]
    ranks = [sorted(body, key=lambda g: -r.T_groups.get(g, -math.inf)).index(body[0]) + 1
             for r in runs]
    named = "" if body[0] == "stem" else f" ({body[0]})"
    out = [f"{stem}: {'supported' if len(low) > k / 2 else 'not supported'} here.** In "
           f"{len(low)} of {k} tasks the stem{named} has a mean T at or below the median of "
           f"the {len(body)} layer groups; it has the highest T in {ranks.count(1)} of "
           f"{len(runs)} runs, and its mean rank is {_mean([float(x) for x in ranks]):.1f}."]
    if len(body) < 3:
        return out + [f"{peak}: cannot be tested here** (fewer than three layer groups)."]
    inside = [t for t, p in profiles.items()
              if 0 < max(range(len(p)), key=lambda i: p[i]) < len(p) - 1]
    depth = [kendall_tau(range(len(body)), [r.T_groups.get(g, math.nan) for g in body])
             if all(math.isfinite(r.T_groups.get(g, math.nan)) for g in body) else math.nan
             for r in runs]
    falling = sum(1 for d in depth if d < -0.5)
    out.append(f"{peak}: {'supported' if len(inside) > k / 2 else 'not supported'} here.** "
               f"In {len(inside)} of {k} tasks the highest mean T is at neither the first nor "
               f"the last layer group. T falls steadily from input to output (Kendall's tau "
               f"with depth below -0.5) in {falling} of {len(runs)} runs.")
    return out


def _findings(result) -> list[str]:
    """The paper's claims (PAPER.md section 3), each with its verdict and its numbers."""
    runs = _ok(result.runs)
    tasks = [t for t in result.tasks if any(r.task == t for r in runs)]
    amounts = sorted({r.N for r in runs})
    problem = _model_problem(result.model)
    out = []
    if problem:
        out.append(f"The explanatory model supports no finding here: {problem}. The claims "
                   "that rest on it are not judged; its numbers below are a record, not "
                   "evidence. The layer-wise claims do not use the model.")
    return out + _model_findings(result, tasks, amounts, problem) + _layer_findings(result)


# ---- the scores ----------------------------------------------------------------------------

def _agreement_sentence(result) -> str:
    """One sentence: does any score rank the tasks better than the best static baseline?"""
    scores = [a for a in result.agreements if not a.baseline]
    k = max((a.tasks for a in scores), default=0)
    if k < 2:
        return "Fewer than two tasks have scores and measured runs: nothing to rank."
    parts = []
    for attr, what in (("tau_T", "measured T"), ("tau_acc", "accuracy")):
        bases = [a for a in result.agreements if a.baseline and math.isfinite(getattr(a, attr))]
        if not bases:
            parts.append(f"against {what} there is no baseline to beat (each is constant "
                         "over the tasks)")
            continue
        best = max(bases, key=lambda a: getattr(a, attr))
        bar = getattr(best, attr)
        beat = [SCORE_NAMES.get(a.score, a.score) for a in scores if getattr(a, attr) > bar]
        who = (f"{len(beat)} of {len(scores)} scores ({', '.join(beat)}) rank the tasks better"
               if beat else "no score ranks the tasks better")
        parts.append(f"against {what} {who} than the best static baseline ({best.score}, "
                     f"Kendall's tau {bar:+.2f})")
    return (f"Over these {k} tasks, {parts[0]}, and {parts[1]}: weak evidence, since with {k} "
            f"tasks one swapped pair moves Kendall's tau by {4 / (k * (k - 1)):.2f}.")


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
              ("p", _agreement_sentence(result)),
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
    runs, failed = _ok(result.runs), [r for r in result.runs if r.status != "done"]
    blocks = [("h1", f"Transferability study: {e['name']}"),
              ("p", f"Pre-trained on `{cfg['pretrain']['data']}` ({cfg['model']['arch']}), "
                    f"fine-tuned on {len(result.tasks)} tasks x data amounts "
                    f"{e['data_amounts']} x seeds {e['seeds']}: {len(result.runs)} runs, "
                    f"{len(runs)} measured, {len(failed)} failed. T = D(θr, θB) / D(θA, θB) "
                    f"per layer group ({e['metric']}), overall = mean over groups without the "
                    "classifier. G: BN-statistics gap of the pre-trained network on the task's "
                    "training pool; D: intraclass variance of its penultimate features; "
                    "N: training images of the run."),
              ("h2", "Findings"), *[("p", f) for f in _findings(result)],
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
