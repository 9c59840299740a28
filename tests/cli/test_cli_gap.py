"""`transfer-fast gap` end to end on small .npz data, and its bad-input exits."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import transfer_fast as tf
from transfer_fast.cli import main
from transfer_fast.train.models import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gap")
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "r18.safetensors"))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 30)
    np.savez(root / "down.npz", x=rng.integers(0, 256, (30, 24, 24, 3), dtype=np.uint8), y=y)
    np.savez(root / "pre.npz", x=rng.integers(0, 128, (30, 24, 24, 3), dtype=np.uint8), y=y)
    return root


def test_gap_writes_table_json_plot_and_matches_the_api(files, capsys):
    out = files / "run"
    args = ["gap", "--model", str(files / "r18.safetensors"), "--arch", "resnet18",
            "--data", str(files / "pre.npz"), "--out", str(files / "pre"),
            "--save-stats", str(files / "pre.safetensors")]
    assert main(args) == 0
    assert main(["gap", "--model", str(files / "r18.safetensors"), "--arch", "resnet18",
                     "--data", str(files / "down.npz"), "--out", str(out),
                 "--reference-stats", str(files / "pre.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "G (BN gap, w2)" in printed and "G (Fréchet)" in printed
    assert "warning: the Fréchet distance is ill-conditioned" in printed  # 30 samples, 512-d
    result = json.loads((out / "gap.json").read_text())
    assert result["N"] == 30 and result["classes"] == 3
    assert (out / "bn_gap.png").stat().st_size > 1000
    assert (out / "bn_gap.csv").read_text().splitlines()[0] == "layer,channels,gap_w2"

    # The same numbers through the Python API, computed independently of the CLI's path.
    model = tf.load_state(files / "r18.safetensors")
    net = build_model("resnet18", 10)
    net.load_state_dict(model)
    net.eval()
    with np.load(files / "down.npz") as z:
        x = (torch.tensor(z["x"]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.225
    gap = tf.bn_gap(net, [x], progress=False)
    assert result["G_bn"] == pytest.approx(gap.mean, rel=1e-6)  # float32 preprocessing
    assert result["frechet"]["regularised_eps"] > 0


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_line(files, tmp_path, capsys):
    model = str(files / "r18.safetensors")
    code, err = run_cli(["gap", "--model", model, "--arch", "resnet18",
                         "--data", str(tmp_path / "missing.npz")], capsys)
    assert code == 2 and "missing.npz" in err and len(err.strip().splitlines()) == 1
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.arange(5))
    code, err = run_cli(["gap", "--model", model, "--arch", "resnet18",
                         "--data", str(tmp_path / "bad.npz")], capsys)
    assert code == 2 and "bad.npz" in err
    code, err = run_cli(["gap", "--model", model, "--arch", "resnet34",
                         "--data", str(files / "down.npz")], capsys)
    assert code == 2 and "r18.safetensors" in err


class NoBN(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def no_bn_net(num_classes=10):
    return NoBN(num_classes)


def test_model_without_batchnorm_names_the_alternative(files, tmp_path, capsys):
    save_file({k: v.contiguous() for k, v in no_bn_net().state_dict().items()},
              str(tmp_path / "plain.safetensors"))
    args = ["gap", "--model", str(tmp_path / "plain.safetensors"), "--arch",
            f"{__name__}:no_bn_net", "--data", str(files / "down.npz"), "--out",
            str(tmp_path / "o")]
    code, err = run_cli(args, capsys)
    assert code == 2 and "--allow-code" in err  # user code is imported only on request
    code, err = run_cli([*args, "--allow-code"], capsys)
    assert code == 2 and "--reference-stats" in err


def test_gap_streams_an_image_folder_with_workers_mean_std_and_format(files, tmp_path,
                                                                      capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    (tmp_path / "imgs" / "class1" / "broken.png").write_bytes(b"not a png")
    base = ["gap", "--model", str(files / "r18.safetensors"), "--arch", "resnet18",
            "-d", str(tmp_path / "imgs"), "--image-size", "16",
            "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--no-plots"]
    results = []
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        with pytest.warns(UserWarning, match="skipped 1 of 13 files"):
            assert main([*base, "-o", str(out), "-w", workers]) == 0
        results.append(json.loads((out / "gap.json").read_text()))
    capsys.readouterr()
    assert results[0]["N"] == 12 and results[0]["skipped_files"] == 1
    assert results[0]["mean"] == [0.485, 0.456, 0.406] and results[0]["image_size"] == 16
    assert results[0]["G_bn"] == pytest.approx(results[1]["G_bn"], rel=1e-6)
    # The paper's normalisation gives another gap; a pdf figure on request.
    base = base[:base.index("--mean")] + ["-f", "pdf", "-w", "0"]
    with pytest.warns(UserWarning, match="skipped"):
        assert main([*base, "-o", str(tmp_path / "paper")]) == 0
    paper = json.loads((tmp_path / "paper" / "gap.json").read_text())
    assert paper["mean"] == [0.5] and paper["G_bn"] != pytest.approx(results[0]["G_bn"])
    assert (tmp_path / "paper" / "bn_gap.pdf").read_bytes().startswith(b"%PDF")
    code, err = run_cli([*base, "-o", str(tmp_path / "x"), "--mean", "0.5,0.5"], capsys)
    assert code == 2 and "mean has 2 values for 3-channel images" in err


BN_NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def net(num_classes, in_channels=3):
    return Net(num_classes, in_channels)
'''


@pytest.mark.parametrize("launcher", ["console_script", "python_m"])
def test_allow_code_imports_from_the_working_folder(files, tmp_path, launcher):
    """A console script's sys.path[0] is its bin/ folder, not the working folder: with
    --allow-code both launchers import `usermodels` from where the user stands."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    work = tmp_path / "project"
    work.mkdir()
    (work / "usermodels.py").write_text(BN_NET)
    sys.path.insert(0, str(work))
    try:
        import usermodels

        model = usermodels.net(10)
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("usermodels", None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "user.safetensors"))
    script = tmp_path / "bin" / "transfer-fast"  # what pip writes for [project.scripts]
    script.parent.mkdir()
    script.write_text("import sys\nfrom transfer_fast.cli import main\nsys.exit(main())\n")
    command = ([sys.executable, str(script)] if launcher == "console_script"
               else [sys.executable, "-m", "transfer_fast"])
    root = str(Path(tf.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    args = ["gap", "--model", str(tmp_path / "user.safetensors"), "--arch", "usermodels:net",
            "-d", str(files / "down.npz"), "-o", str(tmp_path / f"out_{launcher}"),
            "--no-plots"]
    refused = subprocess.run([*command, *args], cwd=work, env=env, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--allow-code" in refused.stderr
    proc = subprocess.run([*command, *args, "--allow-code"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "importing user architecture usermodels:net" in proc.stdout
    assert json.loads((tmp_path / f"out_{launcher}" / "gap.json").read_text())["N"] == 30
