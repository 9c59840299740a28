"""The TOML configuration of `transfer-fast experiment`: schema, defaults, one-shot validation.

Every problem of a config (unknown keys, wrong types, missing values, impossible
values) is collected and reported in one error before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

from ..errors import TransferFastError

REQUIRED = object()
SHIFTS = ("none", "invert", "transpose", "blur", "noise")

# section -> key -> (type, default); lists are written [element type].
SCHEMA: dict[str, dict[str, tuple]] = {
    "experiment": {
        "name": (str, "experiment"),
        "seeds": ([int], [0]),
        "data_amounts": ([int], REQUIRED),
        "learning_rates": ([float], []),  # empty: finetune.lr alone
        "val_fraction": (float, 0.2),
        "device": (str, "auto"),
        "preset": (str, "auto"),
        "metric": (str, "l1_mean"),
        "gap_metric": (str, "w2"),
    },
    "model": {"arch": (str, "tiny-resnet")},
    "pretrain": {
        "data": (str, REQUIRED),
        "epochs": (int, 30),
        "lr": (float, 0.1),
        "batch_size": (int, 64),
        "seed": (int, 0),
    },
    "finetune": {"epochs": (int, 30), "lr": (float, 0.01), "batch_size": (int, 64)},
}
TASK_SCHEMA = {"name": (str, REQUIRED), "data": (str, REQUIRED), "shift": (str, "none"),
               "strength": (float, 1.0)}


def _type_name(kind) -> str:
    return f"a list of {kind[0].__name__}" if isinstance(kind, list) else kind.__name__


def _fits(value, kind) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_fits(v, kind[0]) for v in value)
    if kind is float:  # TOML writes 1 for 1.0; an int is a fine float, a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _section(raw: dict, schema: dict, where: str, errors: list[str]) -> dict:
    out = {}
    for key in raw:
        if key not in schema:
            errors.append(f"{where}.{key}: unknown key (known: {', '.join(schema)})")
    for key, (kind, default) in schema.items():
        if key not in raw:
            if default is REQUIRED:
                errors.append(f"{where}.{key}: missing ({_type_name(kind)})")
            else:
                out[key] = list(default) if isinstance(default, list) else default
            continue
        value = raw[key]
        if not _fits(value, kind):
            errors.append(f"{where}.{key}: expected {_type_name(kind)}, got {value!r}")
            continue
        out[key] = [float(v) for v in value] if kind == [float] else (
            float(value) if kind is float else value)
    return out


def _check_values(cfg: dict, errors: list[str]) -> None:
    from ..measure.gap import GAP_METRICS
    from ..measure.plan import PRESETS
    from ..measure.transferability import METRICS

    e, pre, fine = cfg["experiment"], cfg["pretrain"], cfg["finetune"]
    positive = [("experiment.data_amounts", v) for v in e.get("data_amounts", [])]
    positive += [(f"{s}.{k}", sec[k]) for s, sec in (("pretrain", pre), ("finetune", fine))
                 for k in ("epochs", "lr", "batch_size") if k in sec]
    positive += [("experiment.learning_rates", v) for v in e.get("learning_rates", [])]
    errors += [f"{k}: must be above 0, got {v}" for k, v in positive if not v > 0]
    if e.get("data_amounts") == [] or e.get("seeds") == []:
        errors.append("experiment: data_amounts and seeds need at least one value each")
    for key in ("seeds", "data_amounts", "learning_rates"):  # run names must not collide
        values = [f"{v:g}" for v in e.get(key, [])]
        if len(set(values)) != len(values):
            errors.append(f"experiment.{key}: values must be distinct, got {e[key]}")
    if not 0 < e.get("val_fraction", 0.2) < 1:
        errors.append(f"experiment.val_fraction: must be in (0, 1), got {e['val_fraction']}")
    for key, allowed in (("preset", PRESETS), ("metric", tuple(METRICS)),
                         ("gap_metric", GAP_METRICS), ("device", ("auto", "cpu", "cuda"))):
        if key in e and e[key] not in allowed:
            errors.append(f"experiment.{key}: expected one of {', '.join(allowed)}, "
                          f"got {e[key]!r}")
    names = [t.get("name") for t in cfg["task"]]
    for i, t in enumerate(cfg["task"]):
        if t.get("shift", "none") not in SHIFTS:
            errors.append(f"task[{i}].shift: expected one of {', '.join(SHIFTS)}, "
                          f"got {t['shift']!r}")
        if not t.get("strength", 1.0) > 0:
            errors.append(f"task[{i}].strength: must be above 0, got {t['strength']}")
        name = t.get("name")
        if isinstance(name, str) and (names.count(name) > 1 or not name.replace("-", "")
                                      .replace("_", "").isalnum()):
            errors.append(f"task[{i}].name: {name!r} must be unique and use only letters, "
                          "digits, '-' and '_'")


def parse_config(raw: dict, origin: str = "config") -> dict:
    """The validated config with defaults filled in; TransferFastError listing every problem."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise TransferFastError(f"{origin}: expected a table of sections")
    for key in raw:
        if key not in SCHEMA and key != "task":
            errors.append(f"{key}: unknown section (known: {', '.join(SCHEMA)}, task)")
    cfg = {}
    for name, schema in SCHEMA.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            errors.append(f"{name}: expected a table, got {section!r}")
            section = {}
        cfg[name] = _section(section, schema, name, errors)
    tasks = raw.get("task", [])
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        errors.append("task: expected one or more [[task]] tables")
        tasks = []
    cfg["task"] = [_section(t, TASK_SCHEMA, f"task[{i}]", errors) for i, t in enumerate(tasks)]
    _check_values(cfg, errors)
    if errors:
        raise TransferFastError(f"{origin}: {len(errors)} problem(s): " + "; ".join(errors))
    return cfg


def load_config(source: str | Path | dict) -> dict:
    """A config from a TOML file, a TOML string of the package, or a dict."""
    if isinstance(source, dict):
        return parse_config(source)
    path = Path(source)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise TransferFastError(f"{path}: no such config file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TransferFastError(f"{path}: not valid TOML ({exc})") from exc
    return parse_config(raw, str(path))


def fingerprint(cfg: dict) -> str:
    """Canonical JSON of a validated config: what a run folder was made with."""
    return json.dumps(cfg, sort_keys=True, indent=1)


# `transfer-fast demo`: the paper's study in miniature on scikit-learn's bundled digits.
# Pre-train on digits 0-4, fine-tune on 5-9 under controlled domain shifts and data
# amounts; `transfer-fast demo --print-config` prints it as a starting point.
DEMO_CONFIG = """\
[experiment]
name = "demo"
seeds = [0, 1]
data_amounts = [50, 100, 200, 400]
device = "cpu"           # bit-reproducible on the CPU

[model]
arch = "tiny-resnet"     # a ResNet-shaped CNN for 8x8 images, torchvision's names

[pretrain]
data = "digits:0-4"
epochs = 30
lr = 0.1
batch_size = 64

[finetune]
epochs = 20
lr = 0.01
batch_size = 32

[[task]]
name = "unchanged"
data = "digits:5-9"

[[task]]
name = "inverted"
data = "digits:5-9"
shift = "invert"

[[task]]
name = "transposed"
data = "digits:5-9"
shift = "transpose"

[[task]]
name = "blurred"
data = "digits:5-9"
shift = "blur"
strength = 1.0

[[task]]
name = "noisy"
data = "digits:5-9"
shift = "noise"
strength = 1.0
"""
