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
