"""The TOML configuration of `transfer-fast experiment`: schema, defaults, one-shot validation.

Every problem of a config (unknown keys, wrong types, missing values, values out of
range, a name that would leave the output root, code to import without consent) is
collected and reported in one error before anything runs. A valid config's cost
(`config_cost`) is checked too: a grid past MAX_RUNS runs or MAX_DATA_BYTES of data
in memory is refused unless `allow_large` is given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

from ..errors import TransferFastError

REQUIRED = object()
SHIFTS = ("none", "invert", "transpose", "blur", "noise")

# Ranges of values that size what gets allocated or run: a blur of sigma 1e9 would ask
# for a kernel of 4e9 taps, a grid of 10**6 runs would train for months.
MAX_BLUR_SIGMA = 64.0  # pixels; the kernel has 2 * ceil(2 sigma) + 1 taps
MAX_NOISE_STRENGTH = 100.0  # noise std 0.25 x strength in pixel units
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 1 << 20
MAX_DATA_AMOUNT = 100_000_000  # training samples per run
MAX_RUNS = 10_000  # fine-tuning runs in one grid, without allow_large
MAX_DATA_BYTES = 32 << 30  # rough bytes of data held in memory, without allow_large
MAX_CONFIG_BYTES = 1 << 20  # a TOML config file
MAX_NAME_CHARS = 128  # experiment.name: one folder name under the output root
_DIGITS = re.compile(r"digits:(\d)-(\d)$")
_DIGIT_IMAGES = 180 * 64 * 4  # float32 bytes of the bundled 8x8 digits, per class

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


_STRENGTH_LIMITS = {"blur": MAX_BLUR_SIGMA, "noise": MAX_NOISE_STRENGTH}


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder directly under the output root, or None."""
    if not name or name.strip() != name:
        return "must be a non-empty name without leading or trailing spaces"
    if name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        return "must be a single folder name: no '/', '\\', '.' or '..'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name) or len(name) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} printable characters"
    return None


def _check_model(arch: str, allow_code: bool, errors: list[str]) -> None:
    from ..train.models import ARCHITECTURES

    if arch.strip().lower() in ARCHITECTURES:
        return
    if ":" not in arch:
        errors.append(f"model.arch: unknown architecture {arch!r}: expected one of "
                      f"{', '.join(ARCHITECTURES)}, or package.module:function")
    elif not allow_code:
        errors.append(f"model.arch: {arch!r} would import and run code from module "
                      f"{arch.split(':')[0].strip()!r}; allow it with allow_code=True "
                      "(CLI: --allow-code) if you trust it")


def _check_values(cfg: dict, errors: list[str]) -> None:
    from ..measure.gap import GAP_METRICS
    from ..measure.plan import PRESETS
    from ..measure.transferability import METRICS

    e, pre, fine = cfg["experiment"], cfg["pretrain"], cfg["finetune"]
    positive = [("experiment.data_amounts", v) for v in e.get("data_amounts", [])]
    positive += [(f"{s}.{k}", sec[k]) for s, sec in (("pretrain", pre), ("finetune", fine))
                 for k in ("epochs", "lr", "batch_size") if k in sec]
    positive += [("experiment.learning_rates", v) for v in e.get("learning_rates", [])]
    errors += [f"{k}: must be above 0, got {v}" for k, v in positive
               if not v > 0 or not math.isfinite(v)]
    for key, limit in (("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
        errors += [f"{s}.{key}: at most {limit}, got {sec[key]}"
                   for s, sec in (("pretrain", pre), ("finetune", fine))
                   if key in sec and sec[key] > limit]
    errors += [f"experiment.data_amounts: at most {MAX_DATA_AMOUNT}, got {v}"
               for v in e.get("data_amounts", []) if v > MAX_DATA_AMOUNT]
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
    if isinstance(e.get("name"), str) and _name_problem(e["name"]):
        errors.append(f"experiment.name: {e['name']!r} {_name_problem(e['name'])}")
    names = [t.get("name") for t in cfg["task"]]
    for i, t in enumerate(cfg["task"]):
        if t.get("shift", "none") not in SHIFTS:
            errors.append(f"task[{i}].shift: expected one of {', '.join(SHIFTS)}, "
                          f"got {t['shift']!r}")
        strength, limit = t.get("strength", 1.0), _STRENGTH_LIMITS.get(t.get("shift"))
        if not strength > 0 or not math.isfinite(strength):
            errors.append(f"task[{i}].strength: must be above 0, got {t['strength']}")
        elif limit is not None and strength > limit:
            errors.append(f"task[{i}].strength: at most {limit:g} for shift "
                          f"{t['shift']!r}, got {strength:g}")
        name = t.get("name")
        if isinstance(name, str) and (names.count(name) > 1 or not name.replace("-", "")
                                      .replace("_", "").isalnum()):
            errors.append(f"task[{i}].name: {name!r} must be unique and use only letters, "
                          "digits, '-' and '_'")


@dataclass(frozen=True)
class ConfigCost:
    """What a config asks for: runs in its grid, training samples seen over all runs
    (data amount x epochs), and a rough size of the data held in memory."""

    runs: int
    samples: int
    data_bytes: int

    def describe(self) -> str:
        return (f"{self.runs:,} fine-tuning runs, {self.samples:,} training samples seen, "
                f"about {_size(self.data_bytes)} of data in memory")

    @property
    def large(self) -> bool:
        return self.runs > MAX_RUNS or self.data_bytes > MAX_DATA_BYTES


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _source_bytes(spec: str) -> int:
    from ..io.datasets import dataset_bytes

    match = _DIGITS.match(spec)
    if match:
        return max(0, int(match[2]) - int(match[1]) + 1) * _DIGIT_IMAGES
    return dataset_bytes(spec)


def config_cost(cfg: dict) -> ConfigCost:
    """The cost of a validated config, from its values and the data files' headers."""
    e = cfg["experiment"]
    lrs = max(1, len(e["learning_rates"]))
    per_task = len(e["data_amounts"]) * len(e["seeds"]) * lrs
    samples = sum(e["data_amounts"]) * len(e["seeds"]) * lrs * cfg["finetune"]["epochs"]
    # Each task's data is held once split; a shift and the split copy it while they run.
    held = [_source_bytes(cfg["pretrain"]["data"])] + [_source_bytes(t["data"])
                                                       for t in cfg["task"]]
    return ConfigCost(per_task * len(cfg["task"]), samples * len(cfg["task"]),
                      sum(held) + 2 * max(held))


def parse_config(raw: dict, origin: str = "config", *, allow_code: bool = False,
                 allow_large: bool = False) -> dict:
    """The validated config with defaults filled in; TransferFastError listing every problem.

    Args:
        raw: the parsed TOML (sections experiment, model, pretrain, finetune, task).
        origin: what the messages name (the file).
        allow_code: accept `model.arch = "package.module:function"`, which imports that
            module and runs the function (CLI: --allow-code).
        allow_large: accept a grid past MAX_RUNS runs or MAX_DATA_BYTES of data in
            memory (CLI: --allow-large).
    """
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
    if "arch" in cfg["model"]:
        _check_model(cfg["model"]["arch"], allow_code, errors)
    if not errors and not allow_large:
        cost = config_cost(cfg)
        if cost.large:
            errors.append(f"the grid asks for {cost.describe()}: more than the {MAX_RUNS:,} "
                          f"runs or {MAX_DATA_BYTES >> 30} GiB allowed without "
                          "allow_large=True (CLI: --allow-large)")
    if errors:
        raise TransferFastError(f"{origin}: {len(errors)} problem(s): " + "; ".join(errors))
    return cfg


def load_config(source: str | Path | dict, *, allow_code: bool = False,
                allow_large: bool = False) -> dict:
    """A config from a TOML file or a dict, validated by `parse_config` (see its flags)."""
    if isinstance(source, dict):
        return parse_config(source, allow_code=allow_code, allow_large=allow_large)
    path = Path(source)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise TransferFastError(f"{path}: {path.stat().st_size} bytes; a config is at "
                                    f"most {MAX_CONFIG_BYTES}")
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TransferFastError(f"{path}: no such config file") from exc
    except OSError as exc:
        raise TransferFastError(f"{path}: cannot read ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise TransferFastError(f"{path}: not valid TOML ({str(exc)[:120]})") from exc
    return parse_config(raw, str(path), allow_code=allow_code, allow_large=allow_large)


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
