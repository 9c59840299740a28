"""`transfer-fast experiment`: config validation, a small grid end to end, resume, refusals."""

import csv
import hashlib
import json
import math
import platform
import statistics

import numpy as np
import pytest
import torch

import transfer_fast as tf
from transfer_fast.cli import main
from transfer_fast.pipelines.experiment import run_experiment
from transfer_fast.pipelines.experiment_config import load_config, parse_config


def small_config(**experiment):
    return {
        "experiment": {"name": "t", "seeds": [0], "data_amounts": [40, 120], **experiment},
        "pretrain": {"data": "digits:0-4", "epochs": 3, "batch_size": 64},
        "finetune": {"epochs": 3, "batch_size": 32},
        "task": [{"name": "same", "data": "digits:5-9"},
                 {"name": "inv", "data": "digits:5-9", "shift": "invert"},
                 {"name": "blur", "data": "digits:5-9", "shift": "blur"}],
    }


def test_every_config_problem_in_one_error(tmp_path):
    bad = small_config(colour="red", seeds="zero")
    bad["finetune"]["epochs"] = 2.5
    bad["task"][1]["shift"] = "rotate"
    del bad["pretrain"]["data"]
    with pytest.raises(tf.TransferFastError) as err:
        run_experiment(bad, tmp_path / "out")
    message = str(err.value)
    for part in ("5 problem(s)", "experiment.colour: unknown key",
                 "experiment.seeds: expected a list of int", "finetune.epochs: expected int",
                 "task[1].shift", "pretrain.data: missing"):
        assert part in message
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_toml_file_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("[experiment\n")
    with pytest.raises(tf.TransferFastError, match="bad.toml: not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(tf.TransferFastError, match="no such config"):
        load_config(tmp_path / "missing.toml")
    assert parse_config(small_config())["finetune"]["lr"] == 0.01  # defaults filled in


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run"
    return out, run_experiment(small_config(), out, html=True, progress=False)


CLAIMS = ("A larger domain gap lowers T", "More fine-tuning data lowers T",
          "Data amount and diversity matter at least as much as the gap",
          "The stem is among the least transferable layers",
          "Layer-wise T peaks in the middle of the network")
FIGURES = ("layerwise_T.png", "T_vs_G_and_N.png", "trajectories.png", "model_fit.png",
           "scores_vs_T.png")


def test_small_grid_end_to_end(finished):
    out, result = finished
    assert len(result.runs) == 6 and all(r.status == "done" for r in result.runs)
    for name in ("report.md", "report.html", "runs.csv", "results.json", "manifest.csv",
                 *(f"figures/{f}" for f in FIGURES)):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for claim in CLAIMS:
        assert claim in report
    assert report.count("](figures/") == len(FIGURES)
    # T of each run equals transferability() of its three parameter sets.
    for row in result.runs:
        want = tf.transferability(out / "pretrain" / "random.safetensors",
                                  out / "pretrain" / "pretrained.safetensors",
                                  row.checkpoint)
        assert row.T == pytest.approx(want.overall, rel=1e-9)
        assert list(row.T_groups.values()) == pytest.approx(want.values, rel=1e-9)
        assert list(row.T_groups) == want.groups == result.groups
    assert result.classifier == want.groups[-1]
    # G and D per task from the saved statistics, through the public functions.
    stats = tf.FeatureStats.load(out / "stats" / "inv.safetensors")
    assert result.tasks["inv"].D == pytest.approx(tf.intraclass_variance(stats).normalised)
    assert all(r.D == result.tasks[r.task].D for r in result.runs)
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r.run for r in result.runs]
    assert result.model is not None and math.isfinite(result.model.r2)
    assert result.model.clusters == 3 and result.model.labels == [r.run for r in result.runs]


def test_a_weak_fit_states_no_finding(finished):
    """6 runs for 4 parameters, 3 tasks: the report says why it judges nothing."""
    out, result = finished
    report = (out / "report.md").read_text()
    assert not result.model.reliable
    assert "The explanatory model supports no finding here" in report
    assert "A larger domain gap lowers T: cannot be tested here** (3 measured tasks" in report
    assert "More fine-tuning data lowers T: not judged here**" in report
    assert "The stem is among the least transferable layers: cannot be tested here" in report
    assert "supported here" not in report and "contradicted here" not in report
    # The clustered errors of 3 tasks are degenerate (0 by construction): not shown.
    assert "| G | " in report and "and not shown" in report


def test_scores_per_task_and_their_agreement(finished):
    """The scores come from the same pass as G and D: equal to the in-memory functions on
    the pre-trained network's penultimate features and softmax over each training pool."""
    from transfer_fast.measure.agreement import kendall_tau
    from transfer_fast.pipelines.experiment import _load_tasks
    from transfer_fast.train.models import build_model

    out, result = finished
    data, classes = _load_tasks(load_config(small_config()))
    model = build_model("tiny-resnet", classes["pretrain"], in_channels=1)
    model.load_state_dict(tf.load_state(out / "pretrain" / "pretrained.safetensors"))
    model.eval()
    seen = []
    model.fc.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    x, y = data["blur"][0]
    with torch.no_grad():
        probs = model(x).softmax(1)
    scores = result.tasks["blur"].scores
    assert set(scores) == {"logme", "hscore", "regularized_hscore", "transrate", "nce", "leep"}
    assert scores["logme"] == pytest.approx(tf.logme(seen[0], y), rel=1e-6)
    assert scores["leep"] == pytest.approx(tf.leep(probs, y), rel=1e-6)
    assert scores["nce"] == pytest.approx(tf.nce(probs.argmax(1), y), rel=1e-6)
    tasks = list(result.tasks.values())
    assert all(t.measured == 2 for t in tasks)
    assert tasks[0].mean_T == pytest.approx(statistics.fmean(
        r.T for r in result.runs if r.task == tasks[0].name))
    agreement = {a.score: a for a in result.agreements}
    assert set(agreement) == set(scores) | {"-G", "-classes"}
    assert agreement["-G"].baseline and not agreement["leep"].baseline
    assert agreement["leep"].tau_T == pytest.approx(
        kendall_tau([t.scores["leep"] for t in tasks], [t.mean_T for t in tasks]))
    assert math.isnan(agreement["-classes"].tau_T)  # every task has 5 classes
    report = (out / "report.md").read_text()
    for part in ("## Scores against measured T and accuracy", "## Scores per task",
                 "-G (baseline)", "weak evidence", "Over these 3 tasks"):
        assert part in report


def test_results_json_and_provenance(finished):
    out, result = finished
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"]["inv"]["scores"]["leep"] == pytest.approx(
        result.tasks["inv"].scores["leep"])
    assert {a["score"] for a in saved["agreements"]} >= {"logme", "-G"}
    assert saved["model"]["cluster_df"] == 2 and saved["model"]["reliable"] is False
    assert "checkpoint" not in saved["runs"][0]
    prov = saved["provenance"]
    assert prov["command"] == "Python API" and prov["torch"] == torch.__version__
    assert prov["package"] == tf.__version__ and prov["python"] == platform.python_version()
    assert prov["date"].endswith("+00:00")
    canonical = json.dumps(load_config(small_config()), sort_keys=True, separators=(",", ":"))
    assert prov["config_hash"] == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    report = (out / "report.md").read_text()
    assert "## Provenance" in report and prov["config_hash"] in report


def test_rerun_skips_finished_work_and_other_configs_are_refused(finished):
    out, result = finished
    checkpoint = result.runs[0].checkpoint
    before = checkpoint.stat().st_mtime_ns
    again = run_experiment(small_config(), out, progress=False)
    assert checkpoint.stat().st_mtime_ns == before
    assert [r.T for r in again.runs] == [r.T for r in result.runs]
    # Nothing left to scan: the classifier group comes from the files' names and shapes.
    assert (again.groups, again.classifier) == (result.groups, result.classifier)
    other = small_config()
    other["finetune"]["epochs"] = 4
    with pytest.raises(tf.TransferFastError, match="another config.*delete"):
        run_experiment(other, out)


def test_diverging_run_is_recorded_and_the_rest_goes_on(tmp_path):
    cfg = small_config(learning_rates=[0.01, 1e9], data_amounts=[60])
    cfg["task"] = cfg["task"][:1]
    result = run_experiment(cfg, tmp_path / "out", progress=False)
    status = {r.lr: r.status for r in result.runs}
    assert status == {0.01: "done", 1e9: "failed"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "1 measured, 1 failed" in report and "| failed: loss is" in report


def test_cli_exit_2_on_bad_config(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[experiment]\nseeds = [0]\n')
    assert main(["experiment", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "c.toml" in err and "data_amounts: missing" in err and len(err.splitlines()) == 1


def test_impossible_values_are_refused_before_anything_runs(tmp_path):
    cfg = small_config(seeds=[0, 0], learning_rates=[0.01, 0.010000001])
    cfg["task"][2]["strength"] = 0.0
    with pytest.raises(tf.TransferFastError) as err:
        run_experiment(cfg, tmp_path / "out")
    for part in ("seeds: values must be distinct", "learning_rates: values must be distinct",
                 "task[2].strength: must be above 0"):
        assert part in str(err.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("precious")
    with pytest.raises(tf.TransferFastError, match="not empty"):
        run_experiment(small_config(), tmp_path / "full")


def fake_result(t_of, groups_t, tasks=("a", "b", "c", "d", "e"), amounts=(50, 400),
                noise=0.0):
    """Runs with T = t_of(G, N) and per-group T from groups_t, for the findings alone; the
    model fitted as the pipeline fits it."""
    from types import SimpleNamespace

    from transfer_fast.pipelines.experiment import (
        RunRecord,
        TaskMeasures,
        _agreements,
        _fit,
        _summarise_tasks,
    )

    rng = np.random.default_rng(0)
    gaps = {t: 0.1 * (i + 1) for i, t in enumerate(tasks)}
    runs = [RunRecord(f"{t}-{n}-{s}", t, n, s, 0.01, status="done", val_acc=0.8,
                      T=t_of(gaps[t], n) * (1 + 0.01 * s) * math.exp(noise * rng.normal()),
                      G=gaps[t], D=0.5 + 0.01 * s,
                      T_groups=dict(zip(["stem", "b1", "b2", "fc"], groups_t)))
            for t in tasks for n in amounts for s in (0, 1)]
    measures = {t: TaskMeasures(t, "none", "x", 100, 5, g, g, 0.5) for t, g in gaps.items()}
    _summarise_tasks(measures, runs)
    return SimpleNamespace(runs=runs, tasks=measures, groups=["stem", "b1", "b2", "fc"],
                           classifier="fc", model=_fit(runs, []),
                           agreements=_agreements(measures))


def test_findings_say_whether_each_claim_holds():
    from transfer_fast.report.findings import findings

    paper_like = fake_result(lambda g, n: 50 * (1 - g) / n ** 0.5, [2.0, 5.0, 3.0, 1.0])
    text = " ".join(findings(paper_like))
    assert paper_like.model.reliable and "supports no finding" not in text
    assert "A larger domain gap lowers T: supported here: the 95% CI of G's coefficient" in text
    assert "Kendall's tau of -G with the task's mean T: +1.00 over 5 tasks" in text
    assert "More fine-tuning data lowers T: supported here" in text
    assert "matter at least as much as the gap: supported here" in text
    assert "The stem is among the least transferable layers: supported here" in text
    assert "Layer-wise T peaks in the middle of the network: supported here" in text
    opposite = fake_result(lambda g, n: 5 * (1 + g) * n ** 0.5, [9.0, 5.0, 3.0, 1.0])
    text = " ".join(findings(opposite))
    assert "A larger domain gap lowers T: contradicted here" in text and "lies above zero" in text
    assert "More fine-tuning data lowers T: contradicted here" in text
    assert "least transferable layers: not supported here" in text
    assert "peaks in the middle of the network: not supported here" in text
    assert "falls steadily from input to output" in text and "in 20 of 20 runs" in text
    few = fake_result(lambda g, n: 10.0 / n, [1.0, 2.0, 3.0, 1.0], tasks=("a", "b"),
                      amounts=(50,))
    text = " ".join(findings(few))
    assert "gap lowers T: cannot be tested here" in text
    assert "data lowers T: cannot be tested here" in text


def test_no_finding_from_a_model_that_predicts_worse_than_the_mean():
    from transfer_fast.report.findings import findings

    noise = fake_result(lambda g, n: 10.0, [2.0, 5.0, 3.0, 1.0], noise=1.0)
    assert noise.model.loo_r2 < 0 and not noise.model.reliable
    text = " ".join(findings(noise))
    assert "The explanatory model supports no finding here: its leave-one-out R²" in text
    assert "A larger domain gap lowers T: not judged here" in text
    assert "More fine-tuning data lowers T: not judged here" in text
    assert "as the gap: not judged here" in text
    assert "lowers T: supported" not in text and "contradicted" not in text
