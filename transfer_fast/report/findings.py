"""The findings of an experiment's report: the paper's claims (PAPER.md section 3) judged
from the fitted model's confidence intervals and from the layer-wise T, each as one
sentence with its verdict and its numbers, and how the transferability scores rank the
tasks against the static baselines. "Not judged" when the model is too weak, "cannot be
tested" when the grid is too small."""

from __future__ import annotations

import math
import statistics

from ..measure.agreement import kendall_tau
from ..measure.regression import MIN_DF, interval_verdict
from .study_figures import SCORE_NAMES

MIN_TASKS = MIN_DF + 1  # G and D vary between tasks only: tasks - 1 degrees of freedom


def finite_mean(values) -> float:
    values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def measured_runs(runs):
    return [r for r in runs if r.measured]


def body_groups(result) -> list[str]:
    return [g for g in result.groups if g != result.classifier]


def model_problem(model) -> str | None:
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
        runs = measured_runs(result.runs)

        def mean_t(task, n):
            return finite_mean([r.T for r in runs if r.task == task and r.N == n])
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
    runs, body = measured_runs(result.runs), body_groups(result)
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
    profiles = {t: [finite_mean([r.T_groups.get(g, math.nan) for r in runs if r.task == t])
                    for g in body] for t in result.tasks if any(r.task == t for r in runs)}
    k = len(profiles)
    low = [t for t, p in profiles.items() if p[0] <= statistics.median(p)]
    ranks = [sorted(body, key=lambda g: -r.T_groups.get(g, -math.inf)).index(body[0]) + 1
             for r in runs]
    named = "" if body[0] == "stem" else f" ({body[0]})"
    out = [f"{stem}: {'supported' if len(low) > k / 2 else 'not supported'} here.** In "
           f"{len(low)} of {k} tasks the stem{named} has a mean T at or below the median of "
           f"the {len(body)} layer groups; it has the highest T in {ranks.count(1)} of "
           f"{len(runs)} runs, and its mean rank is {finite_mean([float(x) for x in ranks]):.1f}."]
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


def findings(result) -> list[str]:
    """The paper's claims (PAPER.md section 3), each with its verdict and its numbers."""
    runs = measured_runs(result.runs)
    tasks = [t for t in result.tasks if any(r.task == t for r in runs)]
    amounts = sorted({r.N for r in runs})
    problem = model_problem(result.model)
    out = []
    if problem:
        out.append(f"The explanatory model supports no finding here: {problem}. The claims "
                   "that rest on it are not judged; its numbers below are a record, not "
                   "evidence. The layer-wise claims do not use the model.")
    return out + _model_findings(result, tasks, amounts, problem) + _layer_findings(result)


def agreement_sentence(result) -> str:
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
