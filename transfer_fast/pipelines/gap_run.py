"""`transfer-fast gap`: G, D and N of a downstream data set under a pre-trained model.

One pass of the model over the data accumulates FeatureStats (every BN input and the
penultimate features, per class); from it come the BN-statistics gap per layer, the
intraclass variance and, against saved statistics of the pre-training data, the
Fréchet distance. Writes gap.json, bn_gap.csv and bn_gap.png into the output folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import TransferFastError
from ..io.datasets import batches, load_dataset
from ..io.files import write_csv, write_json
from ..measure.features import FeatureStats, batchnorm_layers
from ..measure.frechet import frechet_distance
from ..measure.gap import bn_gap, data_amount, intraclass_variance
from ..ops.devices import resolve_device
from ..train.models import infer_in_channels, load_model


def run_gap(model_path, arch: str, data_path, *, out="runs/gap", metric: str = "w2",
            batch_size: int = 64, image_size: int | None = None, reference_stats=None,
            save_stats=None, device: str | None = None, backend: str = "auto",
            plots: bool = True) -> dict:
    """Measures and writes the gap report; returns what gap.json holds."""
    model = load_model(arch, model_path).to(resolve_device(device, what="--device"))
    has_bn = bool(batchnorm_layers(model))
    if not has_bn and reference_stats is None:
        raise TransferFastError(f"{model_path}: {arch} has no BatchNorm layer, so the "
                                "BN-statistics gap is undefined; give --reference-stats "
                                "(statistics of the pre-training data) for the Fréchet "
                                "distance instead")
    reference = FeatureStats.load(reference_stats) if reference_stats else None
    data = load_dataset(data_path, image_size=image_size,
                        channels=infer_in_channels(model.state_dict()))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransferFastError(f"{out}: cannot create the output folder ({exc.strerror})") from exc

    with FeatureStats(model, num_classes=len(data.classes), backend=backend) as stats:
        stats.accumulate(batches(data, batch_size), desc=f"statistics of {Path(data_path).name}")
    if save_stats:
        stats.metadata.update(data=str(data_path), arch=arch, model=str(model_path))
        stats.save(save_stats)

    result: dict = {"model": str(model_path), "arch": arch, "data": str(data_path),
                    "N": data_amount(stats), "classes": len(data.classes),
                    "skipped_files": len(data.skipped)}
    if has_bn:
        gap = bn_gap(model, stats, metric=metric)
        result["G_bn"] = gap.mean
        result["bn_gap"] = gap.to_dict()
        _write_table(gap, out / "bn_gap.csv")
        if plots:
            gap.plot(out / "bn_gap.png", title=f"BN-statistics gap of {Path(data_path).name} "
                                              f"under {Path(model_path).name}")
        print(gap.format_table())
    if len(data.classes) >= 2 and stats.penultimate is not None:
        result["D"] = intraclass_variance(stats).to_dict()
    else:
        print("note: D (intraclass variance) needs two classes or more and a Linear classifier")
    if reference is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fd = frechet_distance(reference, stats)
        for w in caught:
            print(f"warning: {w.message}")
        result["G_frechet"] = fd.distance
        result["frechet"] = fd.to_dict()
    write_json(out / "gap.json", result)
    _print_summary(result, out)
    return result


def _write_table(gap, path: Path) -> None:
    rows = [[n, c, repr(v)] for n, c, v in zip(gap.layers, gap.channels, gap.values)]
    write_csv(path, ["layer", "channels", f"gap_{gap.metric}"],
              [*rows, ["mean", "", repr(gap.mean)]])


def _print_summary(result: dict, out: Path) -> None:
    parts = [f"N = {result['N']}"]
    if "G_bn" in result:
        parts.append(f"G (BN gap, {result['bn_gap']['metric']}) = {result['G_bn']:.4g}")
    if "G_frechet" in result:
        parts.append(f"G (Fréchet) = {result['G_frechet']:.4g}")
    if "D" in result:
        parts.append(f"D (intraclass variance) = {result['D']['normalised']:.4g}")
    if result["skipped_files"]:
        parts.append(f"{result['skipped_files']} unreadable files skipped")
    print("; ".join(parts) + f"; wrote {out}/")
