"""`transfer-fast` end to end, in a subprocess like a user runs it."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from transfer_fast import testing


def run(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "transfer_fast", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


@pytest.fixture(scope="module")
def triple_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    r, a, b = testing.triple(testing.resnet_shapes(18), finetuned_classes=10)
    torch.save(r, folder / "r.pt")
    torch.save({"state_dict": a}, folder / "a.pth")
    save_file(b, str(folder / "b.safetensors"))
    return folder


def test_measure_writes_table_json_csv_and_plot(triple_files, tmp_path):
    f = triple_files
    proc = run("measure", "-r", f / "r.pt", "-a", f / "a.pth", "-b", f / "b.safetensors",
               "--preset", "paper", "--json", tmp_path / "t.json", "--csv", tmp_path / "t.csv",
               "--plot", tmp_path / "t.png", check_rc=0)
    assert "layer4.1" in proc.stdout and "overall" in proc.stdout
    result = json.loads((tmp_path / "t.json").read_text())
    assert len(result["groups"]) == 9 and "fc.weight" in result["excluded"]
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "group,d_random,d_pretrained,T,in_overall" and len(lines) == 11
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_info_lists_backends():
    proc = run("info", check_rc=0)
    assert "backend cpu" in proc.stdout and "backend torch available" in proc.stdout


@pytest.mark.parametrize("case", ["missing", "truncated", "mismatch", "nan", "pickle", "text"])
def test_bad_input_exits_2_with_one_line(triple_files, tmp_path, case):
    f = triple_files
    bad = tmp_path / "bad.pt"
    r, a, b = testing.triple(testing.resnet_shapes(18))
    if case == "truncated":
        data = (f / "r.pt").read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif case == "mismatch":
        torch.save({**b, "layer1.0.conv1.weight": torch.zeros(2, 2)}, bad)
    elif case == "nan":
        b["layer2.0.conv2.weight"][0, 0, 0, 0] = float("nan")
        torch.save(b, bad)
    elif case == "text":
        bad.write_text("these are not weights\n")
    elif case == "pickle":
        torch.save({"w": torch.ones(1), "f": print}, bad)  # a function needs unpickling code
    proc = run("measure", "-r", f / "r.pt", "-a", f / "a.pth", "-b", bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transfer-fast: error:"), proc.stderr
    expected = {"missing": "file not found", "truncated": "unreadable or truncated",
                "mismatch": "layer1.0.conv1.weight", "nan": "layer2.0.conv2.weight",
                "pickle": "refused", "text": "unreadable"}[case]
    assert expected in lines[0]


def test_unknown_option_and_bad_values_exit_2():
    assert run("measure", "--preset", "nonsense", "-r", "x", "-a", "y", "-b", "z").returncode == 2
    assert run("demo", "--epochs", "0").returncode == 2


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    proc = run("measure", "-r", tmp_path / "x.pt", "-a", "y", "-b", "z", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unsupported_plot_format_is_one_line(triple_files, tmp_path):
    f = triple_files
    proc = run("measure", "-r", f / "r.pt", "-a", f / "a.pth", "-b", f / "b.safetensors",
               "--plot", tmp_path / "t.xyz")
    assert proc.returncode == 2 and "t.xyz: cannot write" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_runs_the_experiment_and_writes_the_report(tmp_path):
    proc = run("demo", "--out", tmp_path / "demo", "--epochs", "1", "--no-progress",
               check_rc=0)
    assert "40 of 40 runs measured" in proc.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Findings" in report and report.count("](figures/") == 5
    for name in ("layerwise_T.png", "T_vs_G_and_N.png", "trajectories.png", "model_fit.png"):
        assert (tmp_path / "demo" / "figures" / name).stat().st_size > 0


def test_demo_prints_a_config_that_experiment_accepts(tmp_path):
    proc = run("demo", "--print-config", check_rc=0)
    from transfer_fast.pipelines.experiment_config import parse_config, tomllib

    cfg = parse_config(tomllib.loads(proc.stdout))
    assert len(cfg["task"]) == 5 and cfg["experiment"]["data_amounts"] == [50, 100, 200, 400]


# ---- conventions shared by every command ------------------------------------------------

def test_version_and_help_epilog():
    import transfer_fast

    for flag in ("--version", "-V"):
        proc = run(flag, check_rc=0)
        assert proc.stdout.strip() == f"transfer-fast {transfer_fast.__version__}"
    text = run("--help", check_rc=0).stdout
    assert "exit status:" in text and "  3   a bug" in text and "-o --out" in text


def _walk(parser, prefix=""):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{name} ")
        else:
            yield prefix + (" ".join(action.option_strings) or action.dest), action, parser


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from transfer_fast.cli import SHORT_OPTIONS, build_parser

    shorts: dict[str, set] = {}
    for name, action, parser in _walk(build_parser()):
        assert action.help, f"{name} has no help text"
        shown = parser._get_formatter()._get_help_string(action)
        valued = action.option_strings and not action.required and action.nargs != 0
        if valued and not isinstance(action, argparse._VersionAction):
            assert "default" in shown, f"{name}: help does not show the default: {shown!r}"
        long = [o for o in action.option_strings if o.startswith("--")]
        for o in action.option_strings:
            if not o.startswith("--"):
                shorts.setdefault(o, set()).update(long)
    # One meaning per short option in every command, and the documented table is complete.
    assert {k: {v} for k, v in SHORT_OPTIONS.items()} == {k: v for k, v in shorts.items()
                                                           if k != "-h"}


def test_json_and_csv_to_stdout_keep_stdout_parseable(triple_files, tmp_path):
    f = triple_files
    args = ("measure", "-r", f / "r.pt", "-a", f / "a.pth", "-b", f / "b.safetensors")
    proc = run(*args, "--json", "-", check_rc=0)
    assert json.loads(proc.stdout)["groups"][0] and "overall" in proc.stderr
    assert not (tmp_path / "-").exists()
    proc = run(*args, "--csv", "-", "--json", tmp_path / "t.json", check_rc=0)
    assert proc.stdout.splitlines()[0] == "group,d_random,d_pretrained,T,in_overall"
    assert f"wrote {tmp_path / 't.json'}" in proc.stderr
    assert run(*args, "--csv", "-", "--json", "-").returncode == 2


@pytest.mark.parametrize("where", ["file_as_folder", "folder_as_file", "plot_format"])
def test_unusable_outputs_fail_before_measuring(triple_files, tmp_path, where):
    f = triple_files
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    out = {"file_as_folder": ("--json", tmp_path / "file" / "t.json"),
           "folder_as_file": ("--csv", tmp_path / "folder"),
           "plot_format": ("--plot", tmp_path / "t.xyz")}[where]
    # The checkpoints do not exist: the output is refused before they are even opened.
    proc = run("measure", "-r", tmp_path / "nope.pt", "-a", f / "a.pth", "-b", f / "b.pt", *out)
    assert proc.returncode == 2 and str(out[1]) in proc.stderr, proc.stderr
    assert "nope.pt" not in proc.stderr
    assert run("scan", "-r", f / "r.pt", "-a", f / "a.pth", "-o", tmp_path / "file",
               f / "b.safetensors").returncode == 2


def test_scan_exits_1_when_some_rows_failed(triple_files, tmp_path):
    f = triple_files
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((f / "b.safetensors").read_bytes()[:200])
    proc = run("scan", "-r", f / "r.pt", "-a", f / "a.pth", "-o", tmp_path / "run",
               "--no-progress", "--format", "svg", f / "b.safetensors", bad)
    assert proc.returncode == 1, proc.stderr
    assert "1 of 2 checkpoints failed" in proc.stderr
    assert (tmp_path / "run" / "T_heatmap.svg").read_bytes().startswith(b"<?xml")
    assert not (tmp_path / "run" / "T_heatmap.png").exists()
    ok = run("scan", "-r", f / "r.pt", "-a", f / "a.pth", "-o", tmp_path / "run2",
             "--no-progress", "--no-plots", f / "b.safetensors")
    assert ok.returncode == 0, ok.stderr


def test_manifest_columns_named_like_outputs_are_refused(tmp_path):
    from transfer_fast.errors import TransferFastError
    from transfer_fast.pipelines.manifest_columns import (
        RANK_RESERVED,
        SCAN_RESERVED,
        check_user_columns,
    )

    check_user_columns(["dataset", "lr", "label", "run"], SCAN_RESERVED, tmp_path / "m.csv")
    for column in ("group", "T", " status", "overall_T", "seconds", "error", "d_random"):
        with pytest.raises(TransferFastError, match=rf"m\.csv: manifest column\(s\) '{column}'"):
            check_user_columns(["dataset", column], SCAN_RESERVED, tmp_path / "m.csv")
    with pytest.raises(TransferFastError, match="'logme'"):
        check_user_columns(["logme"], RANK_RESERVED, "r.csv")


def test_demo_without_scikit_learn_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util

    from transfer_fast.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("transfer-fast: error: the demo needs scikit-learn: "
                           "pip install scikit-learn")
    assert not (tmp_path / "demo").exists()


def test_scan_figures_name_rows_by_label_then_run_then_path_suffix():
    from transfer_fast.pipelines.scan_journal import ScanRow
    from transfer_fast.pipelines.scan_outputs import row_labels

    paths = [f"/data/sweep/run_{i}/model.safetensors" for i in range(3)]
    plain = [ScanRow.of(p) for p in paths]
    assert row_labels(plain) == ["run_0/model", "run_1/model", "run_2/model"]
    runs = [ScanRow.of(p, columns={"run": f"r{i}"}) for i, p in enumerate(paths)]
    assert row_labels(runs) == ["r0", "r1", "r2"]
    labelled = [ScanRow.of(p, columns={"run": f"r{i}", "label": lab})
                for i, (p, lab) in enumerate(zip(paths, ["lr=0.1", "", "lr=0.1"]))]
    assert row_labels(labelled) == ["lr=0.1#0", "run_1/model", "lr=0.1#2"]


def test_measure_takes_hf_folders_a_groups_file_and_a_classifier(tmp_path):
    """An HF folder with a `bert.` prefix against plain files, custom groups from a TOML
    file: T per group equals a float64 computation over the same groups."""
    r, a, b = testing.triple(testing.bert_shapes())  # names under `bert.`: the task model
    base = {k.removeprefix("bert."): v for k, v in r.items()}  # the base model: no prefix
    save_file(base, str(tmp_path / "r.safetensors"))
    save_file({k.removeprefix("bert."): v for k, v in a.items()}, str(tmp_path / "a.safetensors"))
    testing.save_hf_folder(b, tmp_path / "b", shards=2)
    (tmp_path / "groups.toml").write_text(
        "[[group]]\nname = 'layers'\npattern = 'encoder\\.layer\\.'\n"
        "[[group]]\nname = 'rest'\npattern = '.'\n")
    proc = run("measure", "-r", tmp_path / "r.safetensors", "-a", tmp_path / "a.safetensors",
               "-b", tmp_path / "b", "--groups", tmp_path / "groups.toml", "--json", "-",
               check_rc=0)
    result = json.loads(proc.stdout)
    assert result["groups"][:2] == ["layers", "rest"]

    def group_t(pattern):
        import re

        names = [n for n in b if re.search(pattern, n) and b[n].is_floating_point()]
        dr = sum((r[n].double() - b[n].double()).abs().mean() for n in names) / len(names)
        da = sum((a[n].double() - b[n].double()).abs().mean() for n in names) / len(names)
        return float(dr / da)

    assert result["values"][0] == pytest.approx(group_t(r"encoder\.layer\."), rel=1e-5)
