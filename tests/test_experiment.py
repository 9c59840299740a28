"""`transfer-fast experiment`: config validation, a small grid end to end, resume, refusals."""

import csv
import math

import pytest

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


def test_small_grid_end_to_end(finished):
    out, result = finished
    assert len(result.runs) == 6 and all(r["status"] == "done" for r in result.runs)
    for name in ("report.md", "report.html", "runs.csv", "results.json",
                 "figures/layerwise_T.png", "figures/T_vs_G_and_N.png",
                 "figures/trajectories.png", "figures/model_fit.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for claim in ("Larger gap -> lower T", "More data -> lower T", "first layer is not"):
        assert claim in report
    assert report.count("](figures/") == 4
    # T of each run equals transferability() of its three parameter sets.
    for row in result.runs:
        want = tf.transferability(out / "pretrain" / "random.safetensors",
                                  out / "pretrain" / "pretrained.safetensors",
                                  row["checkpoint"]).overall
        assert row["T"] == pytest.approx(want, rel=1e-9)
    # G and D per task from the saved statistics, through the public functions.
    stats = tf.FeatureStats.load(out / "stats" / "inv.safetensors")
    assert result.tasks["inv"]["D"] == pytest.approx(tf.intraclass_variance(stats).normalised)
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r["run"] for r in result.runs]
    assert result.model is not None and math.isfinite(result.model.r2)


def test_rerun_skips_finished_work_and_other_configs_are_refused(finished):
    out, result = finished
    checkpoint = result.runs[0]["checkpoint"]
    before = checkpoint.stat().st_mtime_ns
    again = run_experiment(small_config(), out, progress=False)
    assert checkpoint.stat().st_mtime_ns == before
    assert [r["T"] for r in again.runs] == [r["T"] for r in result.runs]
    other = small_config()
    other["finetune"]["epochs"] = 4
    with pytest.raises(tf.TransferFastError, match="another config.*delete"):
        run_experiment(other, out)


def test_diverging_run_is_recorded_and_the_rest_goes_on(tmp_path):
    cfg = small_config(learning_rates=[0.01, 1e9], data_amounts=[60])
    cfg["task"] = cfg["task"][:1]
    result = run_experiment(cfg, tmp_path / "out", progress=False)
    status = {r["lr"]: r["status"] for r in result.runs}
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


def fake_result(t_of, groups_t, tasks=("a", "b", "c"), amounts=(50, 400)):
    """Runs with T = t_of(G, N) and per-group T from groups_t, for the findings alone."""
    from types import SimpleNamespace

    gaps = {t: 0.1 * (i + 1) for i, t in enumerate(tasks)}
    runs = [{"run": f"{t}-{n}-{s}", "task": t, "N": n, "seed": s, "status": "done",
             "T": t_of(gaps[t], n) * (1 + 0.01 * s), "G": gaps[t], "D": 0.5 + 0.01 * s,
             "T_groups": dict(zip(["stem", "b1", "b2", "fc"], groups_t))}
            for t in tasks for n in amounts for s in (0, 1)]
    return SimpleNamespace(runs=runs, tasks={t: {"G": g} for t, g in gaps.items()},
                           groups=["stem", "b1", "b2", "fc"], classifier="fc")


def test_findings_say_whether_each_claim_holds():
    from transfer_fast.measure.regression import fit_transferability_model
    from transfer_fast.report.experiment import _findings

    def findings(result):
        fitted = fit_transferability_model(result.runs)
        return " ".join(_findings(result, fitted))

    paper_like = fake_result(lambda g, n: 50 * (1 - g) / n ** 0.5, [2.0, 5.0, 3.0, 1.0])
    text = findings(paper_like)
    assert "Larger gap -> lower T: holds" in text and "More data -> lower T: holds" in text
    assert "first layer is not the most transferable: holds" in text
    opposite = fake_result(lambda g, n: 5 * (1 + g) * n ** 0.5, [9.0, 5.0, 3.0, 1.0])
    text = findings(opposite)
    assert "Larger gap -> lower T: does not hold" in text
    assert "More data -> lower T: does not hold" in text
    assert "first layer is not the most transferable: does not hold" in text
    assert "falls steadily from input to output" in text and "in 12 of 12 runs" in text
    few = fake_result(lambda g, n: 10.0 / n, [1.0, 2.0, 3.0, 1.0], tasks=("a", "b"),
                      amounts=(50,))
    text = " ".join(_findings(few, None))
    assert "gap -> lower T: cannot be tested" in text and "data -> lower T: cannot be" in text
