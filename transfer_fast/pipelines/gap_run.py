"""`transfer-fast gap`: G, D and N of a downstream data set under a pre-trained model.

One pass of the model over the data accumulates FeatureStats (every BN input and the
penultimate features, per class); from it come the BN-statistics gap per layer, the
intraclass variance and, against saved statistics of the pre-training data, the
Fréchet distance. Writes gap.json, bn_gap.csv and the bn_gap figure (png, pdf or svg)
into the output folder. An image folder is streamed: decoded by DataLoader workers as
the model needs it, never held whole.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import TransferFastError
from ..io.data_stream import default_workers, open_dataset
from ..io.datasets import MEAN, STD
from ..io.files import write_csv, write_json
from ..measure.features import FeatureStats, batchnorm_layers
from ..measure.frechet import frechet_distance
from ..measure.gap import bn_gap, data_amount, intraclass_variance
from ..ops.devices import resolve_device
from ..report.figures import check_format, figure_path
from ..train.models import infer_in_channels, load_model


def run_gap(model_path, arch: str, data_path, *, out="runs/gap", metric: str = "w2",
            batch_size: int = 64, image_size: int | None = None, reference_stats=None,
            save_stats=None, device: str | None = None, backend: str = "auto",
            plots: bool = True, workers: int | None = None, mean=MEAN, std=STD,
            figure_format: str = "png") -> dict:
    """Measures and writes the gap report; returns what gap.json holds.

    workers: DataLoader processes decoding an image folder (default `default_workers()`;
    0 decodes in this process). mean, std: the normalisation of pixels in [0, 1], one
    value or one per channel (default the paper's 0.5 and 0.225).
    """
    fmt = check_format(figure_format)
    run_device = resolve_device(device, what="--device")
    model = load_model(arch, model_path).to(run_device)
    has_bn = bool(batchnorm_layers(model))
    if not has_bn and reference_stats is None:
        raise TransferFastError(f"{model_path}: {arch} has no BatchNorm layer, so the "
                                "BN-statistics gap is undefined; give --reference-stats "
                                "(statistics of the pre-training data) for the Fréchet "
                                "distance instead")
    reference = FeatureStats.load(reference_stats) if reference_stats else None
    data = open_dataset(data_path, image_size=image_size,
                        channels=infer_in_channels(model.state_dict()), mean=mean, std=std)
    workers = default_workers() if workers is None else workers
    out = Path(out)
    try:  # before the pass over the data: an unusable folder fails now, not after an hour
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransferFastError(f"{out}: cannot create the output folder ({exc.strerror})") from exc
    with FeatureStats(model, num_classes=len(data.classes), backend=backend) as stats:
        stats.accumulate(data.batches(batch_size, workers=workers,
                                      pin_memory=run_device.type == "cuda"),
                         desc=f"statistics of {Path(data_path).name}")
    if save_stats:
        stats.metadata.update(data=str(data_path), arch=arch, model=str(model_path))
        stats.save(save_stats)

    result: dict = {"model": str(model_path), "arch": arch, "data": str(data_path),
                    "N": data_amount(stats), "classes": len(data.classes),
                    "skipped_files": len(data.skipped), "image_size": image_size,
                    "mean": _listed(mean), "std": _listed(std)}
    if has_bn:
        gap = bn_gap(model, stats, metric=metric)
        result["G_bn"] = gap.mean
        result["bn_gap"] = gap.to_dict()
        _write_table(gap, out / "bn_gap.csv")
        if plots:
            gap.plot(figure_path(out, "bn_gap", fmt),
                     title=f"BN-statistics gap of {Path(data_path).name} under "
                           f"{Path(model_path).name}")
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


def _listed(value) -> list[float]:
    return [float(v) for v in ([value] if isinstance(value, (int, float)) else value)]


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
