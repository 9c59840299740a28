"""Grouping presets: which tensors form one layer group, the groups' network order, the head.

Everything here works on names and shapes alone, so the same weights give the same
groups whether they come from a .pt file (module order), a .safetensors file (names
sorted as text) or a sharded folder. A grouping maps a tensor name to (group, order)
or None; `order` sorts the groups into network order. The torchvision/timm layouts
(resnet, densenet, vit) see names without the prefix all names share and name their
groups so ('layer1.0'); the others see and keep whole names ('model.layers.0'), which
cannot change with a tensor saved or not. Inside a group, tensors follow `within_key`:
a module's own tensors before its children's, weight before bias, numbers compared as
numbers, and for the ResNet, DenseNet and ViT layouts the modules in the order
torchvision and timm register them (so results are bitwise those of module-ordered
state dicts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from torch import nn

from ..errors import TransferFastError
from ..io.names import natural_key

PRESETS = ("auto", "paper", "resnet", "densenet", "vit", "transformer", "convnext", "generic")
Grouping = Callable[[str], "tuple[str, tuple] | None"]

# The one classifier rule (`classifier_name`): module names that mean "output head".
HEAD_WORDS = frozenset({"fc", "head", "heads", "classifier", "last_linear", "logits", "lm_head",
                        "score", "qa_outputs"})
# Heads of pre-training objectives or in front of the classifier: head-like, ranked lower.
AUX_HEAD_WORDS = frozenset({"cls", "pre_classifier"})
# Linear-like modules that are never the output layer: embeddings and poolers.
_NEVER_HEAD = re.compile(r"(?:^|\.)(?:\w*embed\w*|wte|wpe|shared|pooler)(?:\.|$)", re.I)


def _head_word_index(parts: Sequence[str]) -> int | None:
    """Index of the first head word in a module path, None if none or if it sits inside a
    numbered block ('layer1.0.se.fc' is part of a block, 'classifier.2' is a head)."""
    for i, part in enumerate(parts):
        if part.isdigit():
            return None
        if part in HEAD_WORDS or part in AUX_HEAD_WORDS:
            return i
    return None


def head_module(name: str) -> str | None:
    """The outermost head module a tensor belongs to ('classifier' for
    'classifier.dense.weight', 'cls' for an MLM head), or None for body tensors."""
    parts = name.split(".")[:-1]
    i = _head_word_index(parts)
    return ".".join(parts[:i + 1]) if i is not None else None


def _linear_like(shape: Sequence[int]) -> bool:
    return len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))


def classifier_name(names: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The module that is the network's output layer, from tensor names and shapes alone.

    Among modules with a linear-like weight (2-D, or a 1x1 convolution): those under a
    head name (`HEAD_WORDS`: fc, head, classifier, lm_head, score, qa_outputs, ...; the
    auxiliary `cls`, `pre_classifier` rank lower) and not inside a numbered block win;
    of them, the last in numeric-aware name order. Without any, the last such module
    (in that order) that is not inside a numbered block ('4' of an nn.Sequential) nor
    an embedding or a pooler.
    None for a headless network, e.g. a language model whose head is tied to its
    embedding and was not saved. `shapes` maps each name to its shape.
    """
    best_key, best = None, None
    for name in names:
        if not name.endswith(".weight") or not _linear_like(shapes[name]):
            continue
        module = name[:-len(".weight")]
        parts = module.split(".")
        i = _head_word_index(parts)
        if i is not None:
            rank = 1 if parts[i] in AUX_HEAD_WORDS else 2
        elif any(p.isdigit() for p in parts[:-1]) or _NEVER_HEAD.search(module):
            continue  # inside a numbered block, an embedding or a pooler: not the output
        else:
            rank = 0
        key = (rank, natural_key(module))
        if best_key is None or key > best_key:
            best_key, best = key, module
    return best


# The module rule: what a model's classifier is, for training and for the feature hooks
# (the names rule above reads checkpoints; a model's head is its last nn.Linear).
def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier of a model: the module `name`, else the last nn.Linear in registration
    order (its input is the penultimate features).

    Raises:
        TransferFastError: no such module, not an nn.Linear, or no nn.Linear at all.
    """
    if name is not None:
        try:
            head = model.get_submodule(name)
        except AttributeError as exc:
            raise TransferFastError(f"the model has no submodule {name!r}") from exc
        if not isinstance(head, nn.Linear):
            raise TransferFastError(f"head {name!r} is a {type(head).__name__}, not nn.Linear")
        return name, head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TransferFastError(f"{type(model).__name__} has no nn.Linear classifier to "
                                "replace; name it with head=...")
    return linears[-1]



# ----- order inside a group ------------------------------------------------------------

_LEAF_RANK = {"weight": 0, "bias": 1}
# Module registration order where text order differs (torchvision ResNet/DenseNet, timm ViT).
_RESNET_RANK = {"conv1": 0, "bn1": 1, "conv2": 2, "bn2": 3, "conv3": 4, "bn3": 5, "downsample": 6}
_DENSENET_RANK = {"conv0": 0, "norm0": 1, "norm1": 2, "conv1": 3, "norm2": 4, "conv2": 5,
                  "norm": 6, "conv": 7}
_VIT_RANK = {"norm1": 0, "attn": 1, "ls1": 2, "norm2": 3, "mlp": 4, "ls2": 5, "qkv": 0,
             "q_norm": 1, "k_norm": 2, "proj": 3, "fc1": 0, "norm": 1, "fc2": 2}


@lru_cache(maxsize=1 << 16)
def _natural(text: str) -> tuple:
    return tuple(natural_key(text))  # module names repeat ('layers', 'mlp', '0'): cached


def _part_key(part: str, ranks: Mapping[str, int] | None) -> tuple:
    return 1, ranks.get(part, 99) if ranks else 99, _natural(part)


def leaf_key(name: str) -> tuple:
    """Order of a module's own tensors: weight, bias, then the rest by name."""
    leaf = name.rsplit(".", 1)[-1]
    return _LEAF_RANK.get(leaf, 2), leaf


def within_key(name: str, ranks: Mapping[str, int] | None = None) -> tuple:
    """Sort key of a tensor inside its group: own tensors before children's, weight before
    bias, `ranks` for sibling modules, then numbers as numbers."""
    *modules, leaf = name.split(".")
    return (*(_part_key(p, ranks) for p in modules), (0, _LEAF_RANK.get(leaf, 2), _natural(leaf)))


def _module_of(name: str, ranks: Mapping[str, int] | None = None) -> tuple[str, tuple]:
    """(module of a tensor, its sort key); a top-level tensor is its own module, a leaf."""
    if "." not in name:
        return name, within_key(name)
    module = name.rsplit(".", 1)[0]
    if ranks is None:  # numeric-aware text order; one regex split, not one per part
        return module, ((1, 99, natural_key(module)),)
    return module, tuple(_part_key(p, ranks) for p in module.split("."))


# ----- groupings ------------------------------------------------------------------------

def _resnet(name: str):
    if name.startswith(("conv1.", "bn1.")):
        return "stem", (0,)
    if m := re.match(r"layer(\d+)\.(\d+)\.", name):
        return f"layer{m[1]}.{m[2]}", (1, int(m[1]), int(m[2]))
    return None


def _densenet(name: str):
    name = name.removeprefix("features.")
    if name.startswith(("conv0.", "norm0.")):
        return "stem", (0,)
    if m := re.match(r"denseblock(\d+)\.denselayer(\d+)\.", name):
        return f"denseblock{m[1]}.denselayer{m[2]}", (1, int(m[1]), 0, int(m[2]))
    if m := re.match(r"transition(\d+)\.", name):
        return f"transition{m[1]}", (1, int(m[1]), 1, 0)
    if name.startswith("norm5."):
        return "norm5", (1.5,)
    return None


def _vit(name: str):
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token")):
        return "patch_embed", (0,)
    if m := re.match(r"blocks\.(\d+)\.", name):
        return f"blocks.{m[1]}", (1, int(m[1]))
    if name.startswith(("norm.", "fc_norm.")):
        return "norm", (1.5,)
    return None


_BLOCK = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks|block)\.(\d+))\.")
_EMBED = re.compile(r"(?:^|\.)(?:\w*embed\w*|wte|wpe|shared|cls_token|mask_token|reg_token|"
                    r"dist_token)(?:\.|$)", re.I)
_NORM = re.compile(r"(?:^|\.)(?:\w*norm\w*|ln_f|ln_post)(?:\.|$)", re.I)
_POOLER = re.compile(r"(?:^|\.)pooler\.")


def _transformer(name: str):
    """Embeddings / each numbered block (`layers.N`, `layer.N`, `h.N`, `blocks.N`,
    `block.N` under any prefix; a decoder's after the encoder's) / final norm / pooler /
    other head modules. The classifier is taken out before (`classifier_name`)."""
    if m := _BLOCK.match(name):
        container = m[1][:-len(m[2]) - 1]
        return m[1], (1, int("decoder" in container), _natural(container), int(m[2]))
    if _EMBED.search(name):
        return "embeddings", (0,)
    if (head := head_module(name)) is not None:
        return head, (4, natural_key(head))
    if _POOLER.search(name):
        return "pooler", (3,)
    if _NORM.search(name):
        return "norm", (2,)
    return None


_CNX_PREFIX = r"^(?:convnext\w*\.)?(?:encoder\.)?"
_CNX_STEM = re.compile(_CNX_PREFIX + r"(?:stem|downsample_layers\.0|features\.0|embeddings)\.")
_CNX_DOWN = re.compile(_CNX_PREFIX + r"(stages\.(\d+)\.(?:downsample|downsampling_layer)|"
                       r"downsample_layers\.(\d+))\.")
_CNX_BLOCK = re.compile(_CNX_PREFIX + r"(stages\.(\d+)\.(?:blocks\.|layers\.)?(\d+))\.")
_CNX_FEATURES = re.compile(r"^(features\.(\d+))\.(\d+)\.")  # torchvision
_CNX_NORM = re.compile(_CNX_PREFIX + r"(?:head\.|classifier\.|norm_pre\.|norm\.|layernorm\.)")


def _convnext(name: str):
    """Stem / per stage its downsample then each block (timm `stages.S.blocks.B`, the
    original `stages.S.B`, Hugging Face `stages.S.layers.B`, torchvision `features.K.B`) /
    final norm (`head.norm`, `norm`, torchvision's `classifier.0`). The classifier is
    taken out before (`classifier_name`)."""
    if _CNX_STEM.match(name):
        return "stem", (0,)
    if m := _CNX_FEATURES.match(name):
        k = int(m[2])
        if k % 2 == 0:  # torchvision: 2, 4, 6 are the downsamples in front of stages 1-3
            return m[1], (1, k // 2, 0, 0)
        return f"{m[1]}.{m[3]}", (1, k // 2, 1, int(m[3]))
    if m := _CNX_DOWN.match(name):
        return m[1], (1, int(m[2] or m[3]), 0, 0)
    if m := _CNX_BLOCK.match(name):
        return m[1], (1, int(m[2]), 1, int(m[3]))
    if _CNX_NORM.match(name):
        return "norm", (2,)
    return None


def _generic(name: str):
    module, key = _module_of(name)
    return module, (1, key)


def generic_grouping(arch: str, prefix: str = "") -> Grouping:
    """One group per module, in the network order of `arch` where its layout knows the
    tensor (a ResNet's modules in torchvision's order), numeric-aware order elsewhere.
    `prefix`: what to remove from the names for the layout's patterns."""
    layout, ranks = GROUPINGS.get(arch), WITHIN_RANKS.get(arch)
    if layout is None or arch == "generic":
        return _generic

    def group(name: str):
        found = layout(name[len(prefix):] if name.startswith(prefix) else name)
        module, key = _module_of(name, ranks)
        return module, (*(found[1] if found else (8,)), key)

    return group


GROUPINGS: dict[str, Grouping] = {"resnet": _resnet, "densenet": _densenet, "vit": _vit,
                                  "transformer": _transformer, "convnext": _convnext,
                                  "generic": _generic}
WITHIN_RANKS: dict[str, Mapping[str, int]] = {"resnet": _RESNET_RANK,
                                              "densenet": _DENSENET_RANK, "vit": _VIT_RANK}


def detect_architecture(names: Sequence[str]) -> str:
    """'resnet', 'densenet', 'vit' (timm), 'convnext', 'transformer' or 'generic', from the
    tensor names alone."""
    joined = "\n".join(names)
    if "conv1.weight" in names and re.search(r"^layer\d+\.\d+\.conv\d\.weight$", joined, re.M):
        return "resnet"
    if re.search(r"denseblock\d+\.denselayer\d+\.", joined):
        return "densenet"
    if re.search(r"^blocks\.\d+\.attn\.", joined, re.M):
        return "vit"
    if re.search(r"(?:^|\.)(?:stages\.\d+\.(?:blocks\.|layers\.)?\d+\.(?:conv_dw|dwconv)\.weight"
                 r"|features\.\d+\.\d+\.layer_scale)$", joined, re.M):
        return "convnext"
    if re.search(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.(?:.*\.)?(?:self_attn|attention"
                 r"|attn|SelfAttention|self_attention)\.", joined, re.M):
        return "transformer"
    return "generic"


# ----- custom groups --------------------------------------------------------------------

MAX_GROUPS_FILE_BYTES = 1 << 20
GroupSpec = tuple[tuple[str, str], ...]  # ((name, pattern), ...) in order; first match wins


def load_groups(groups) -> tuple[GroupSpec, str | None]:
    """(rules, classifier) from a groups file (.toml or .json) or an in-memory list.

    Format: an ordered list of groups, each a name and a regular expression searched in
    the tensor names (as loaded, wrapper prefixes removed); the first group whose
    pattern matches a tensor takes it, and tensors no pattern matches are left out and
    listed in `excluded`. A name may use the pattern's captures (`\\1`, `\\g<id>`) to make
    one group per match, e.g. name 'block \\1' with pattern '^layers\\.(\\d+)\\.'. Groups
    come in the order of the list (groups of one entry: numbers as numbers). An
    optional `classifier` names the group left out of the overall value.

        # groups.toml                          # groups.json
        classifier = "head"                    {"classifier": "head", "groups": [
        [[group]]                                {"name": "stem", "pattern": "^stem\\\\."},
        name = "stem"                            ...]}
        pattern = '^stem\\.'                   (or just the list)

    In memory: a list of {"name": ..., "pattern": ...} or (name, pattern) pairs.
    Raises TransferFastError naming the file and entry that is wrong.
    """
    origin, classifier = "groups", None
    if isinstance(groups, (str, Path)):
        origin = str(groups)
        raw = _read_groups_file(Path(groups))
        if isinstance(raw, Mapping):
            classifier = raw.get("classifier")
            raw = raw.get("group", raw.get("groups"))
        groups = raw
    if not isinstance(groups, Sequence) or isinstance(groups, str) or not groups:
        raise TransferFastError(f"{origin}: expected a non-empty list of groups, each a name "
                                "and a pattern")
    rules = []
    for i, entry in enumerate(groups):
        if isinstance(entry, Mapping):
            entry = (entry.get("name"), entry.get("pattern"))
        if (not isinstance(entry, Sequence) or len(entry) != 2
                or not all(isinstance(x, str) and x for x in entry)):
            raise TransferFastError(f"{origin}: group {i + 1} needs a 'name' and a 'pattern' "
                                    f"(strings), got {entry!r}"[:300])
        try:
            re.compile(entry[1])
        except re.error as exc:
            raise TransferFastError(f"{origin}: group {entry[0]!r}: bad pattern "
                                    f"{entry[1]!r} ({exc})") from exc
        rules.append((entry[0], entry[1]))
    if classifier is not None and not isinstance(classifier, str):
        raise TransferFastError(f"{origin}: 'classifier' must be a group name")
    return tuple(rules), classifier


def _read_groups_file(path: Path):
    if not path.is_file():
        raise TransferFastError(f"{path}: groups file not found")
    if path.stat().st_size > MAX_GROUPS_FILE_BYTES:
        raise TransferFastError(f"{path}: groups file larger than 1 MiB")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise TransferFastError(f"{path}: unreadable groups file ({exc})") from exc
    raise TransferFastError(f"{path}: groups file must be .toml or .json")


def custom_grouping(rules: GroupSpec) -> Grouping:
    """The grouping of `rules` (see `load_groups`), on full tensor names."""
    compiled = [(i, name, re.compile(pattern)) for i, (name, pattern) in enumerate(rules)]

    def group(name: str):
        for i, label, pattern in compiled:
            if m := pattern.search(name):
                label = m.expand(label) if "\\" in label else label
                return label, (i, natural_key(label))
        return None

    return group
