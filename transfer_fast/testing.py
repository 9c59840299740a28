"""State dicts with the names and shapes of well-known architectures, for tests and benchmarks.

torchvision, timm and transformers are not needed: the names and shapes are written out
here following torchvision's ResNet/DenseNet/ConvNeXt, timm's ViT/ConvNeXt and Hugging
Face's Llama/BERT/GPT-2, in the order their modules register them. Values are random.
`save_hf_folder` writes a state dict as a sharded Hugging Face folder with its index.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .measure.presets import classifier_name
from .ops.packed import PackedLayout


def _bn(prefix: str, c: int) -> Iterator[tuple[str, tuple]]:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        yield f"{prefix}.{leaf}", (c,)
    yield f"{prefix}.num_batches_tracked", ()


def resnet_shapes(depth: int = 50, num_classes: int = 1000, width: int = 64
                  ) -> dict[str, tuple]:
    """torchvision ResNet-18/34/50/101/152 parameter and buffer shapes, in module order;
    `width` (64 in torchvision) scales every layer for small test models."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
              152: [3, 8, 36, 3]}[depth]
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    shapes = {"conv1.weight": (width, 3, 7, 7), **dict(_bn("bn1", width))}
    inplanes = width
    for i, (count, planes) in enumerate(zip(blocks, (width, 2 * width, 4 * width, 8 * width)),
                                        start=1):
        for j in range(count):
            p = f"layer{i}.{j}"
            if bottleneck:
                convs = [(planes, inplanes, 1, 1), (planes, planes, 3, 3),
                         (planes * expansion, planes, 1, 1)]
            else:
                convs = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
            for k, shape in enumerate(convs, start=1):
                shapes[f"{p}.conv{k}.weight"] = shape
                shapes.update(_bn(f"{p}.bn{k}", shape[0]))
            if j == 0 and (i > 1 or inplanes != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", planes * expansion))
            inplanes = planes * expansion
    shapes["fc.weight"] = (num_classes, inplanes)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def densenet121_shapes(num_classes: int = 1000, growth: int = 32) -> dict[str, tuple]:
    """torchvision DenseNet-121 shapes: growth 32, blocks (6, 12, 24, 16); a smaller
    `growth` scales the widths for small test models."""
    c = 2 * growth
    shapes = {"features.conv0.weight": (c, 3, 7, 7), **dict(_bn("features.norm0", c))}
    for b, layers in enumerate((6, 12, 24, 16), start=1):
        for j in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{j}"
            shapes.update(_bn(f"{p}.norm1", c))
            shapes[f"{p}.conv1.weight"] = (4 * growth, c, 1, 1)
            shapes.update(_bn(f"{p}.norm2", 4 * growth))
            shapes[f"{p}.conv2.weight"] = (growth, 4 * growth, 3, 3)
            c += growth
        if b < 4:
            shapes.update(_bn(f"features.transition{b}.norm", c))
            shapes[f"features.transition{b}.conv.weight"] = (c // 2, c, 1, 1)
            c //= 2
    shapes.update(_bn("features.norm5", c))
    shapes["classifier.weight"] = (num_classes, c)
    shapes["classifier.bias"] = (num_classes,)
    return shapes


def vit_shapes(dim: int = 768, depth: int = 12, patch: int = 16, tokens: int = 197,
               num_classes: int = 1000) -> dict[str, tuple]:
    """timm VisionTransformer shapes; the defaults are ViT-B/16 (86M parameters)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}"
        shapes.update({
            f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,),
            f"{p}.attn.qkv.weight": (3 * dim, dim), f"{p}.attn.qkv.bias": (3 * dim,),
            f"{p}.attn.proj.weight": (dim, dim), f"{p}.attn.proj.bias": (dim,),
            f"{p}.norm2.weight": (dim,), f"{p}.norm2.bias": (dim,),
            f"{p}.mlp.fc1.weight": (4 * dim, dim), f"{p}.mlp.fc1.bias": (4 * dim,),
            f"{p}.mlp.fc2.weight": (dim, 4 * dim), f"{p}.mlp.fc2.bias": (dim,),
        })
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,),
                   "head.weight": (num_classes, dim), "head.bias": (num_classes,)})
    return shapes


def llama_shapes(layers: int = 2, dim: int = 16, vocab: int = 32, hidden: int = 24,
                 lm_head: bool = True, prefix: str = "model.") -> dict[str, tuple]:
    """Hugging Face LlamaForCausalLM shapes (`lm_head=False`, `prefix=""`: LlamaModel)."""
    shapes = {f"{prefix}embed_tokens.weight": (vocab, dim)}
    for i in range(layers):
        p = f"{prefix}layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (dim, dim)
        shapes.update({f"{p}.mlp.gate_proj.weight": (hidden, dim),
                       f"{p}.mlp.up_proj.weight": (hidden, dim),
                       f"{p}.mlp.down_proj.weight": (dim, hidden),
                       f"{p}.input_layernorm.weight": (dim,),
                       f"{p}.post_attention_layernorm.weight": (dim,)})
    shapes[f"{prefix}norm.weight"] = (dim,)
    if lm_head:
        shapes["lm_head.weight"] = (vocab, dim)
    return shapes


def bert_shapes(layers: int = 2, dim: int = 16, vocab: int = 30, hidden: int = 32,
                positions: int = 16, num_labels: int | None = 3,
                prefix: str = "bert.") -> dict[str, tuple]:
    """BertForSequenceClassification shapes (`num_labels=None`, `prefix=""`: BertModel)."""
    e = f"{prefix}embeddings"
    shapes = {f"{e}.word_embeddings.weight": (vocab, dim),
              f"{e}.position_embeddings.weight": (positions, dim),
              f"{e}.token_type_embeddings.weight": (2, dim),
              f"{e}.LayerNorm.weight": (dim,), f"{e}.LayerNorm.bias": (dim,),
              f"{e}.position_ids": (1, positions)}
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}"
        for part, shape in (("attention.self.query", (dim, dim)),
                            ("attention.self.key", (dim, dim)),
                            ("attention.self.value", (dim, dim)),
                            ("attention.output.dense", (dim, dim)),
                            ("attention.output.LayerNorm", (dim,)),
                            ("intermediate.dense", (hidden, dim)),
                            ("output.dense", (dim, hidden)),
                            ("output.LayerNorm", (dim,))):
            shapes[f"{p}.{part}.weight"] = shape
            shapes[f"{p}.{part}.bias"] = shape[:1]
    shapes.update({f"{prefix}pooler.dense.weight": (dim, dim),
                   f"{prefix}pooler.dense.bias": (dim,)})
    if num_labels:
        shapes.update({"classifier.weight": (num_labels, dim), "classifier.bias": (num_labels,)})
    return shapes


def gpt2_shapes(layers: int = 2, dim: int = 16, vocab: int = 32, positions: int = 16,
                lm_head: bool = True) -> dict[str, tuple]:
    """GPT2LMHeadModel shapes (Conv1D weights are (in, out)); its lm_head is tied to wte."""
    shapes = {"transformer.wte.weight": (vocab, dim), "transformer.wpe.weight": (positions, dim)}
    for i in range(layers):
        p = f"transformer.h.{i}"
        for part, shape in (("ln_1", (dim,)), ("attn.c_attn", (dim, 3 * dim)),
                            ("attn.c_proj", (dim, dim)), ("ln_2", (dim,)),
                            ("mlp.c_fc", (dim, 4 * dim)), ("mlp.c_proj", (4 * dim, dim))):
            shapes[f"{p}.{part}.weight"] = shape
            shapes[f"{p}.{part}.bias"] = shape[-1:]
    shapes.update({"transformer.ln_f.weight": (dim,), "transformer.ln_f.bias": (dim,)})
    if lm_head:
        shapes["lm_head.weight"] = (vocab, dim)
    return shapes


def convnext_shapes(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes: int = 10,
                    layout: str = "timm") -> dict[str, tuple]:
    """ConvNeXt shapes in timm's layout (`stem`, `stages.S.downsample`,
    `stages.S.blocks.B`, `head.norm`, `head.fc`) or torchvision's (`layout="torchvision"`:
    `features.0` stem, `features.2S-1.B` blocks, `features.2S` downsamples,
    `classifier.0` norm, `classifier.2` linear)."""
    def both(prefix, shape):
        return {f"{prefix}.weight": shape, f"{prefix}.bias": shape[:1]}

    tv = layout == "torchvision"
    shapes = {**both("features.0.0" if tv else "stem.0", (dims[0], 3, 4, 4)),
              **both("features.0.1" if tv else "stem.1", (dims[0],))}
    for s, (depth, d) in enumerate(zip(depths, dims)):
        if s:
            down = f"features.{2 * s}" if tv else f"stages.{s}.downsample"
            shapes.update({**both(f"{down}.0", (dims[s - 1],)),
                           **both(f"{down}.1", (d, dims[s - 1], 2, 2))})
        for b in range(depth):
            p = f"features.{2 * s + 1}.{b}" if tv else f"stages.{s}.blocks.{b}"
            if tv:
                shapes[f"{p}.layer_scale"] = (d, 1, 1)
            else:
                shapes[f"{p}.gamma"] = (d,)
            for part, shape in (("block.0" if tv else "conv_dw", (d, 1, 7, 7)),
                                ("block.2" if tv else "norm", (d,)),
                                ("block.3" if tv else "mlp.fc1", (4 * d, d)),
                                ("block.5" if tv else "mlp.fc2", (d, 4 * d))):
                shapes.update(both(f"{p}.{part}", shape))
    shapes.update({**both("classifier.0" if tv else "head.norm", (dims[-1],)),
                   **both("classifier.2" if tv else "head.fc", (num_classes, dims[-1]))})
    return shapes


def save_hf_folder(state: Mapping[str, torch.Tensor], folder: str | Path, *, shards: int = 2,
                   fmt: str = "safetensors") -> Path:
    """`state` as a Hugging Face folder: `shards` shard files ("safetensors" or "bin") and
    the index JSON naming each tensor's shard (one plain file for shards=1)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map, size = {}, 0
    for i in range(shards):
        part = {n: state[n].detach().clone().contiguous() for n in names[i::shards]}
        file = (f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}" if shards > 1
                else f"{stem}.{suffix}")
        if fmt == "safetensors":
            save_file(part, str(folder / file))
        else:
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
        size += sum(t.numel() * t.element_size() for t in part.values())
    if shards > 1:
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return folder


def random_state(shapes: dict[str, tuple], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random values for the shapes; integer zeros for num_batches_tracked and positions
    for position_ids, like torch and transformers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(shape, dtype=torch.long)
        elif name.endswith("position_ids"):
            state[name] = torch.arange(shape[-1]).expand(shape).clone()
        else:
            state[name] = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype) * 0.05
    return state


def triple(shapes: dict[str, tuple], seed: int = 0, finetuned_classes: int | None = None,
           step: float = 0.2) -> tuple[dict, dict, dict]:
    """(θr, θA, θB): θA = θr + a large move, θB = θA + a small move, like real training.

    With `finetuned_classes`, θB's classifier (the module `classifier_name` picks:
    'fc', 'head', 'classifier', 'head.fc', ...) gets a new number of outputs, as after
    replacing the head for a downstream task.
    """
    r = random_state(shapes, seed)
    a = {k: v + n if v.is_floating_point() else v
         for (k, v), n in zip(r.items(), random_state(shapes, seed + 1).values())}
    b = {k: v + step * n if v.is_floating_point() else v
         for (k, v), n in zip(a.items(), random_state(shapes, seed + 2).values())}
    if finetuned_classes is not None:
        head = classifier_name(list(shapes), shapes)
        heads = {name: (finetuned_classes, *shapes[name][1:]) for name in shapes
                 if name.rpartition(".")[0] == head}
        b.update(random_state(heads, seed + 3))
    return r, a, b


# ---- the compiled ops' sample inputs ------------------------------------------------------

# Elements per chunk row of the distance kernels (csrc/common/distance_sums.h).
KERNEL_CHUNK = 1 << 16


def _sets(sizes, count: int, dtype, device, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(n, generator=g) + 0.1 * k).to(device, dtype) for n in sizes]
            for k in range(count)]


def sample_inputs(op: str, device: str | torch.device = "cpu") -> list[tuple]:
    """Argument tuples for `torch.ops.transfer_fast.<op>` on `device` that reach its edges:
    empty tensors, sizes one past a chunk row, several anchor and target sets, each dtype
    family, labels or none, a given shift or none, both memory layouts of channel_stats.

    The one set of samples of each op: the correctness tests compare the op on these with
    the float64 reference, and `torch.library.opcheck` checks them, on every device.
    op: 'multi_tensor_distance', 'packed_distance', 'packed_chunks' or 'channel_stats'.
    """
    def flat(a_sets, b_sets):
        return ([t for s in a_sets for t in s], [t for s in b_sets for t in s], len(a_sets[0]))

    distance_cases = [([10, 1030, 0], 2, 1, torch.float32),
                      ([KERNEL_CHUNK + 3, 1], 1, 3, torch.float64),
                      ([5000, 7], 2, 2, torch.float16)]
    if op == "multi_tensor_distance":
        return [flat(_sets(sizes, a, dtype, device, 0), _sets(sizes, k, dtype, device, 1))
                for sizes, a, k, dtype in distance_cases]
    if op == "packed_distance":
        out = []
        for sizes, a, k, dtype in distance_cases:
            a_sets, b_sets = _sets(sizes, a, dtype, device, 0), _sets(sizes, k, dtype, device, 1)
            layout = PackedLayout.from_tensors(a_sets[0])
            buffers = []
            for sets in (a_sets, b_sets):
                buf = layout.new_buffer(len(sets), dtype=dtype, device=device)
                for row, tensors in zip(buf, sets):
                    layout.pack(tensors, out=row)
                buffers.append(buf)
            out.append((*buffers, layout.chunks_on(device), len(sizes)))
        return out
    if op == "packed_chunks":
        return [(torch.tensor([0, 16, 32]), torch.tensor([5, 0, KERNEL_CHUNK + 1])),
                (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))]
    if op == "channel_stats":
        g = torch.Generator().manual_seed(2)
        x = torch.randn(6, 3, 5, generator=g).to(device)
        labels = torch.tensor([0, 1, 1, 0, 2, 0], device=device)
        f64 = dict(dtype=torch.float64, device=device)
        return [(x, torch.zeros(3, **f64), labels, 4, False),   # class 3 empty
                (x, None, labels, 3, False),                   # each channel's first value
                (x.transpose(1, 2).contiguous(), torch.full((3,), 0.5, **f64), None, 1, True),
                ((x * 100 + 1e4).double(), None, None, 1, False),
                (x[:0], None, None, 1, False)]                 # no samples
    raise ValueError(f"no samples for op {op!r}")
