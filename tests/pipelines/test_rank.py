"""`transfer-fast rank` end to end: scores per candidate equal the in-memory scores of the
same features (whose float64 references are in tests/measure/test_scores.py), resume,
failed rows and the exit status."""

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import transfer_fast as tf
from transfer_fast.cli import main
from transfer_fast.train.models import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("tiny-resnet", 5, in_channels=1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(root / f"m{seed}.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
             y=rng.integers(0, 4, 40))
    return root


def reference_scores(path, data):
    """Penultimate features and softmax outputs captured with a plain hook."""
    model = tf.pipelines.rank.load_model("tiny-resnet", path)
    with np.load(data) as z:
        x = (torch.tensor(z["x"]).float()[:, None] / 255 - 0.5) / 0.225
        y = torch.tensor(z["y"])
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = []
    handle = head.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].double()))
    with torch.no_grad():
        probs = model(x).double().softmax(1)
    handle.remove()
    f = seen[0]
    return {"logme": tf.logme(f, y), "hscore": tf.hscore(f, y), "transrate": tf.transrate(f, y),
            "leep": tf.leep(probs, y), "nce": tf.nce(probs.argmax(1), y)}


def test_rank_scores_every_model_resumes_and_reports_failures(files, capsys):
    import transfer_fast.pipelines.rank  # noqa: F401  (reference_scores reads its loader)

    out = files / "run"
    models = [str(files / "m0.safetensors"), str(files / "m1.safetensors")]
    options = ["--arch", "tiny-resnet", "--data", str(files / "data.npz"), "--out", str(out),
               "--batch-size", "16", "--no-progress"]
    assert main(["rank", *models, *options]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["label"] for r in rows] == ["m0.safetensors", "m1.safetensors"]
    for row, path in zip(rows, models):
        want = reference_scores(path, files / "data.npz")
        for name, value in want.items():
            assert float(row[name]) == pytest.approx(value, rel=1e-6, abs=1e-9), name
        assert row["status"] == "ok" and int(row["N"]) == 40
    assert (out / "scores.png").stat().st_size > 1000
    assert len((out / "journal.jsonl").read_text().splitlines()) == 2

    # A rerun skips both; a missing model is a failed row and exit status 1.
    assert main(["rank", *models, str(files / "missing.safetensors"), *options]) == 1
    assert len((out / "journal.jsonl").read_text().splitlines()) == 3
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert rows[2]["status"] == "failed" and "missing" in rows[2]["error"]
    capsys.readouterr()


def test_rank_refuses_code_without_opt_in_and_other_options(files, capsys):
    common = ["--data", str(files / "data.npz"), "--no-progress"]
    code = main(["rank", str(files / "m0.safetensors"), "--arch", "os:system",
                 "--out", str(files / "x"), *common])
    assert code == 2 and "--allow-code" in capsys.readouterr().err
    out = files / "y"
    assert main(["rank", str(files / "m0.safetensors"), "--arch", "tiny-resnet",
                 "--out", str(out), "--no-plots", *common]) == 0
    assert main(["rank", str(files / "m0.safetensors"), "--arch", "tiny-resnet",
                 "--out", str(out), "--batch-size", "7", *common]) == 2
    assert "other options" in capsys.readouterr().err
