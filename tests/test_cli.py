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
    assert "Findings" in report and report.count("](figures/") == 4
    for name in ("layerwise_T.png", "T_vs_G_and_N.png", "trajectories.png", "model_fit.png"):
        assert (tmp_path / "demo" / "figures" / name).stat().st_size > 0


def test_demo_prints_a_config_that_experiment_accepts(tmp_path):
    proc = run("demo", "--print-config", check_rc=0)
    from transfer_fast.pipelines.experiment_config import parse_config, tomllib

    cfg = parse_config(tomllib.loads(proc.stdout))
    assert len(cfg["task"]) == 5 and cfg["experiment"]["data_amounts"] == [50, 100, 200, 400]
