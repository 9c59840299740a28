"""pretrain / finetune: the protocol, checkpoints and sidecars, resume, the trajectory.

Tiny MLPs on scikit-learn's digits (8x8), a few epochs each, so the file runs in seconds.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import transfer_fast as tf
from transfer_fast import TransferFastError, transferability
from transfer_fast.pipelines.experiment_data import digits_split
from transfer_fast.train.finetune import find_head, finetune, pretrain, replace_head

FAST = dict(epochs=3, batch_size=64, progress=False)
DELAY = 0.0  # seconds per sample in SlowDigits; the killed subprocess sets it


class Net(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(x.flatten(1)))


TASK_A = digits_split(range(0, 5), seed=0)  # pre-training: digits 0-4
TASK_B = digits_split(range(5, 10), seed=0)  # fine-tuning: digits 5-9 as 0-4
TASK_C = digits_split(range(5, 8), seed=0)  # fine-tuning: 3 classes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy machine
    their spin-waits make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sidecar(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """θr and θA of Net on digits 0-4, in one folder."""
    out = tmp_path_factory.mktemp("pre")
    return pretrain(Net, *TASK_A, out=out, lr=0.1, seed=0, **FAST).checkpoint


class Stop(Exception):
    """Stands for a kill after an epoch."""


def stop_after(epoch: int):
    def hook(record: dict) -> None:
        if record["epoch"] == epoch:
            raise Stop
    return hook


# ---- protocol and checkpoints -------------------------------------------------------

def test_pretrain_is_deterministic_for_a_seed(tmp_path):
    runs = [pretrain(Net, *TASK_A, out=tmp_path / name, seed=seed, **FAST)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (load_file(r.checkpoint) for r in runs)
    assert states_equal(a, b) and runs[0].history == runs[1].history
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    assert all(r.status == "done" for r in runs)


def test_random_init_is_saved_before_the_first_step(pretrained):
    torch.manual_seed(0)
    fresh = Net().state_dict()
    theta_r, theta_a = load_file(pretrained.with_name("random.safetensors")), load_file(pretrained)
    assert states_equal(theta_r, fresh)
    assert not torch.equal(theta_r["body.0.weight"], theta_a["body.0.weight"])
    meta = sidecar(pretrained.parent, "random")
    assert meta["seed"] == 0 and meta["classes"] == 5 and meta["N"] == len(TASK_A[0][1])


class Relabelled(Dataset):
    """Validation data whose labels can be shifted by one class mid-run."""

    def __init__(self, data):
        self.x, self.y = data
        self.shift = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], (self.y[i] + self.shift) % 5


def test_the_best_validation_parameters_are_kept(pretrained, tmp_path):
    model, val, seen = Net(), Relabelled(TASK_B[1]), {}

    def hook(record):
        seen[record["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}
        val.shift = 1 if record["epoch"] == 2 else val.shift  # later epochs score near 0

    res = finetune(model, pretrained, TASK_B[0], val, num_classes=5, out=tmp_path, epochs=4,
                   batch_size=64, progress=False, on_epoch=hook, trajectory=False)
    accs = [r["val_acc"] for r in res.history]
    assert res.best_epoch <= 2 < len(accs) and res.best_acc == max(accs) > accs[-1]
    assert states_equal(load_file(res.checkpoint), seen[res.best_epoch])


def test_sidecar_records_the_run(pretrained, tmp_path):
    res = finetune(Net, pretrained, *TASK_B, num_classes=5, out=tmp_path, seed=3, **FAST)
    meta = sidecar(tmp_path, "finetuned")
    assert meta["status"] == "done" and meta["reason"] is None
    assert meta["checkpoint"] == "finetuned.safetensors" and res.checkpoint.exists()
    assert meta["seed"] == 3 and meta["classes"] == 5
    assert (meta["N"], meta["N_val"]) == (len(TASK_B[0][1]), len(TASK_B[1][1]))
    assert meta["val_acc"] == [r["val_acc"] for r in res.history] and len(meta["val_acc"]) == 3
    assert meta["config"]["epochs"] == 3 and meta["config"]["lr"] == 0.01
    assert meta["config"]["schedule"] == "cosine" and meta["config"]["head"] == "fc"
    assert meta["config"]["pretrained"] == str(pretrained.resolve())
    assert [r["lr"] for r in res.history] == pytest.approx([0.01, 0.0075, 0.0025])
    assert time.strptime(meta["time"], "%Y-%m-%dT%H:%M:%S%z") and meta["seconds"] > 0
    assert not (tmp_path / "resume-finetune.pt").exists()  # removed when the run ends


def test_pretraining_lr_steps_down_every_third(tmp_path):
    res = pretrain(Net, *TASK_A, out=tmp_path, epochs=6, batch_size=256, progress=False)
    assert [r["lr"] for r in res.history] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])


def test_dataset_and_dataloader_inputs(tmp_path):
    (x, y), val = TASK_A
    runs = [pretrain(Net, TensorDataset(x, y), val, out=tmp_path / name, **FAST)
            for name in ("a", "b")]
    assert states_equal(*(load_file(r.checkpoint) for r in runs))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    res = pretrain(Net, loader, DataLoader(TensorDataset(*val), batch_size=100),
                   out=tmp_path / "c", **FAST)
    assert res.status == "done" and sidecar(tmp_path / "c", "pretrained")["N"] == len(y)


# ---- resume -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
@pytest.mark.parametrize("stop", [1, 2])
def test_resume_after_an_interruption_is_bit_identical(pretrained, tmp_path, kind, stop):
    def run(out, hook=None):
        if kind == "pretrain":
            return pretrain(Net, *TASK_A, out=out, on_epoch=hook, **FAST)
        return finetune(Net, pretrained, *TASK_C, num_classes=3, out=out, on_epoch=hook,
                        **FAST)

    name = "pretrained" if kind == "pretrain" else "finetuned"
    whole = run(tmp_path / "whole")
    with pytest.raises(Stop):
        run(tmp_path / "cut", stop_after(stop))
    state = torch.load(tmp_path / "cut" / f"resume-{kind}.pt", weights_only=True)
    assert state["epoch"] == stop and not (tmp_path / "cut" / f"{name}.json").exists()
    resumed = run(tmp_path / "cut")
    assert states_equal(load_file(whole.checkpoint), load_file(resumed.checkpoint))
    assert whole.history == resumed.history and whole.best_epoch == resumed.best_epoch
    if kind == "finetune":
        assert (json.loads(whole.trajectory.read_text())
                == json.loads(resumed.trajectory.read_text()))


class SlowDigits(Dataset):
    """200 digits read one sample at a time, DELAY seconds each: an epoch to kill."""

    def __init__(self, data):
        self.x, self.targets = data[0][:200], data[1][:200]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        time.sleep(DELAY)
        return self.x[i], self.targets[i]


def killable_run(out: Path, hook=None):
    """The run the SIGKILL test kills in a subprocess and then resumes here."""
    return pretrain(Net, SlowDigits(TASK_A[0]), TASK_A[1], out=out, epochs=6, batch_size=50,
                    progress=False, on_epoch=hook)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    script = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "torch.set_num_threads(1); import test_finetune as t; "
              "t.DELAY = 0.002; "
              f"t.killable_run(__import__('pathlib').Path({str(tmp_path / 'cut')!r}), "
              "lambda r: print('epoch', r['epoch'], flush=True))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.split() == ["epoch", "2"]:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "cut" / "resume-pretrain.pt", weights_only=True)
    assert 2 <= state["epoch"] < 6, "the kill came after the run ended"
    assert not (tmp_path / "cut" / "pretrained.json").exists()
    resumed = killable_run(tmp_path / "cut")
    whole = killable_run(tmp_path / "whole")
    assert states_equal(load_file(whole.checkpoint), load_file(resumed.checkpoint))
    assert whole.history == resumed.history and len(whole.history) == 6


def test_a_finished_run_returns_its_record(tmp_path):
    first = pretrain(Net, *TASK_A, out=tmp_path, **FAST)
    again = pretrain(Net, *TASK_A, out=tmp_path, on_epoch=stop_after(1), **FAST)
    assert again == first


def test_a_folder_with_another_config_is_refused(tmp_path):
    pretrain(Net, *TASK_A, out=tmp_path, **FAST)
    with pytest.raises(TransferFastError, match=r"lr: 0.1 then, 0.05 now.*to start fresh"):
        pretrain(Net, *TASK_A, out=tmp_path, lr=0.05, **FAST)


# ---- the head, the trajectory -------------------------------------------------------

def test_the_classifier_is_the_last_linear_or_the_named_module():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, 10, bias=False))

    model = Nested()
    assert find_head(model)[0] == "head.1"
    assert replace_head(model, 3) == "head.1"
    assert model.head[1].out_features == 3 and model.head[1].bias is None
    assert replace_head(model, 7, "proj") == "proj" and model.proj.out_features == 7
    with pytest.raises(TransferFastError, match="not nn.Linear"):
        find_head(model, "head")
    with pytest.raises(TransferFastError, match="no submodule"):
        find_head(model, "tail")
    with pytest.raises(TransferFastError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.ReLU()))


def test_finetune_loads_the_body_and_a_new_head(pretrained, tmp_path):
    res = finetune(Net, pretrained, *TASK_C, num_classes=3, out=tmp_path, epochs=1, lr=1e-12,
                   batch_size=64, progress=False, trajectory=False)  # D(θA, θB) = 0: T = inf
    theta_a, theta_b = load_file(pretrained), load_file(res.checkpoint)
    assert theta_b["fc.weight"].shape == (3, 32)
    for name in ("body.0.weight", "body.2.bias"):
        torch.testing.assert_close(theta_b[name], theta_a[name], rtol=0, atol=1e-9)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))  # head '1'; θA's body is unexpected
    with pytest.raises(TransferFastError, match="does not fit the model.*body.0.weight"):
        finetune(other, pretrained, *TASK_C, num_classes=3, out=tmp_path / "x", **FAST)


def test_the_trajectory_leaves_the_old_head_out(pretrained, tmp_path):
    res = finetune(Net, pretrained, *TASK_C, num_classes=3, out=tmp_path, epochs=4,
                   batch_size=64, progress=False)
    traj = json.loads(res.trajectory.read_text())
    assert traj["groups"] == ["body.0", "body.2"] and traj["epochs"] == [1, 2, 3, 4]
    assert len(traj["T"]) == 4 and all(len(row) == 2 for row in traj["T"])
    assert traj["excluded"]["fc.weight"].startswith("classifier shape differs")
    assert (tmp_path / "trajectory.png").stat().st_size > 0
    measured = transferability(res.random, pretrained, res.checkpoint)  # θr, θA, θB
    assert traj["overall"][res.best_epoch - 1] == pytest.approx(measured.overall, rel=1e-12)
    same = finetune(Net, pretrained, *TASK_B, num_classes=5, out=tmp_path / "same", **FAST)
    excluded = json.loads(same.trajectory.read_text())["excluded"]
    assert excluded["fc.weight"] == "classifier replaced for fine-tuning"


# ---- bad input, divergence ----------------------------------------------------------

class NoTargets(Dataset):
    """Labels only known by loading the samples."""

    def __init__(self, data):
        self.x, self.y = data

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_labels_beyond_the_classes_are_refused_before_training(pretrained, tmp_path):
    ten = digits_split(range(0, 10), seed=0)
    with pytest.raises(TransferFastError,
                       match=r"training labels: value 9 is outside \[0, num_classes=5\)"):
        pretrain(Net, *ten, out=tmp_path / "a", **FAST)
    assert not (tmp_path / "a").exists()
    with pytest.raises(TransferFastError, match=r"labels: value 4 is outside \[0, num_classes=3\)"):
        finetune(Net, pretrained, *TASK_B, num_classes=3, out=tmp_path / "b", **FAST)
    with pytest.raises(TransferFastError, match="labels: value"):  # found in the first batch
        pretrain(Net, NoTargets(ten[0]), ten[1], out=tmp_path / "c", **FAST)
    assert not (tmp_path / "c" / "resume-pretrain.pt").exists()
    (x, y), val = TASK_A
    with pytest.raises(TransferFastError, match="integer class indices"):
        pretrain(Net, (x, y.float()), val, out=tmp_path / "d", **FAST)


@pytest.mark.parametrize("bad, match", [
    (dict(epochs=0), "bad training options"), (dict(amp="fp8"), "bad training options"),
    (dict(schedule="linear"), "bad training options"), (dict(colour=1), "unknown training"),
    (dict(train=(torch.ones(3, 64),)), "(x, y)"),
    (dict(train=(torch.ones(3, 64), torch.zeros(2, dtype=torch.long))), "one length"),
    (dict(train=[1, 2]), "(x, y)"), (dict(train="digits"), "Dataset")])
def test_bad_options_and_data(tmp_path, bad, match):
    args = dict(train=TASK_A[0], **FAST) | bad
    with pytest.raises(TransferFastError, match=match):
        pretrain(Net, args.pop("train"), TASK_A[1], out=tmp_path, **args)


def test_finetune_without_random_init_for_the_trajectory(tmp_path):
    out = tmp_path / "pre"
    res = pretrain(Net, *TASK_A, out=out, **FAST)
    (out / "random.safetensors").unlink()
    with pytest.raises(TransferFastError, match="trajectory=False"):
        finetune(Net, res.checkpoint, *TASK_B, num_classes=5, out=tmp_path / "b", **FAST)
    done = finetune(Net, res.checkpoint, *TASK_B, num_classes=5, out=tmp_path / "b",
                    trajectory=False, **FAST)  # the advice works in the same folder
    assert done.status == "done" and done.trajectory is None


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_a_diverging_run_is_recorded_as_failed(pretrained, tmp_path, kind):
    (x, y), val = TASK_B
    x = x.clone()
    x[5] = float("nan")

    def run():
        if kind == "pretrain":
            return pretrain(Net, (x, y), val, out=tmp_path, **FAST)
        return finetune(Net, pretrained, (x, y), val, num_classes=5, out=tmp_path, **FAST)

    res = run()
    name = "pretrained" if kind == "pretrain" else "finetuned"
    assert res.status == "failed" and "loss is nan in epoch 1" in res.reason
    assert res.checkpoint is None and not (tmp_path / f"{name}.safetensors").exists()
    meta = sidecar(tmp_path, name)
    assert meta["status"] == "failed" and meta["reason"] == res.reason
    assert not (tmp_path / f"resume-{kind}.pt").exists()
    assert run() == res  # recorded, not run again


class OddHead(nn.Module):
    """A head named 'out' and another Linear after it: no name the planner knows."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.out = nn.Linear(32, num_classes)
        self.aux = nn.Linear(num_classes, num_classes)

    def forward(self, x):  # aux is not used: only its parameters matter to the plan
        return self.out(self.body(x.flatten(1)))


def test_trajectory_with_a_head_the_planner_does_not_know(tmp_path):
    pre = pretrain(OddHead, *TASK_A, out=tmp_path / "a", head="out", **FAST)
    res = finetune(OddHead, pre.checkpoint, *TASK_C, num_classes=3, out=tmp_path / "b",
                   head="out", **FAST)
    traj = json.loads(res.trajectory.with_suffix(".json").read_text())
    assert "out.weight" in traj["excluded"] and len(traj["overall"]) == 3


@pytest.mark.parametrize("bad, match", [
    (lambda y: y[:, None], r"shape \(\d+, 1\): expected \(N,\)"),
])
def test_labels_of_the_wrong_shape(tmp_path, bad, match):
    x, y = TASK_A[0]
    with pytest.raises(TransferFastError, match=match):
        pretrain(Net, (x, bad(y)), TASK_A[1], out=tmp_path, **FAST)


def test_a_train_config_object_equals_keyword_options(tmp_path):
    """TrainConfig and keyword overrides describe the same protocol: same bits, same result."""
    a = pretrain(Net, *TASK_A, out=tmp_path / "kw", **FAST)
    config = tf.TrainConfig(epochs=FAST["epochs"], lr=0.1, batch_size=FAST["batch_size"],
                            schedule="step")
    b = pretrain(Net, *TASK_A, out=tmp_path / "cfg", config=config,
                 **{k: v for k, v in FAST.items() if k not in ("epochs", "batch_size")})
    assert a.history == b.history
    assert tf.load_state(a.checkpoint).keys() == tf.load_state(b.checkpoint).keys()
    assert all(torch.equal(x, y) for x, y in zip(tf.load_state(a.checkpoint).values(),
                                                 tf.load_state(b.checkpoint).values()))
