"""State dicts with the names and shapes of well-known architectures, for tests and benchmarks.

torchvision is not needed: the names and shapes are written out here following
torchvision's ResNet/DenseNet and timm's ViT. Values are random.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _bn(prefix: str, c: int) -> Iterator[tuple[str, tuple]]:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        yield f"{prefix}.{leaf}", (c,)
    yield f"{prefix}.num_batches_tracked", ()


def resnet_shapes(depth: int = 50, num_classes: int = 1000) -> dict[str, tuple]:
    """torchvision ResNet-18/34/50/101/152 parameter and buffer shapes, in module order."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
              152: [3, 8, 36, 3]}[depth]
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    shapes = {"conv1.weight": (64, 3, 7, 7), **dict(_bn("bn1", 64))}
    inplanes = 64
    for i, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for j in range(count):
            p = f"layer{i}.{j}"
            if bottleneck:
                convs = [(width, inplanes, 1, 1), (width, width, 3, 3),
                         (width * expansion, width, 1, 1)]
            else:
                convs = [(width, inplanes, 3, 3), (width, width, 3, 3)]
            for k, shape in enumerate(convs, start=1):
                shapes[f"{p}.conv{k}.weight"] = shape
                shapes.update(_bn(f"{p}.bn{k}", shape[0]))
            if j == 0 and (i > 1 or inplanes != width * expansion):
                shapes[f"{p}.downsample.0.weight"] = (width * expansion, inplanes, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", width * expansion))
            inplanes = width * expansion
    shapes["fc.weight"] = (num_classes, inplanes)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def densenet121_shapes(num_classes: int = 1000) -> dict[str, tuple]:
    """torchvision DenseNet-121 shapes: growth 32, blocks (6, 12, 24, 16)."""
    shapes = {"features.conv0.weight": (64, 3, 7, 7), **dict(_bn("features.norm0", 64))}
    c = 64
    for b, layers in enumerate((6, 12, 24, 16), start=1):
        for j in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{j}"
            shapes.update(_bn(f"{p}.norm1", c))
            shapes[f"{p}.conv1.weight"] = (128, c, 1, 1)
            shapes.update(_bn(f"{p}.norm2", 128))
            shapes[f"{p}.conv2.weight"] = (32, 128, 3, 3)
            c += 32
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


def random_state(shapes: dict[str, tuple], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random values for the shapes; integer zeros for num_batches_tracked, like torch."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(shape, dtype=torch.long)
        else:
            state[name] = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype) * 0.05
    return state


def triple(shapes: dict[str, tuple], seed: int = 0, finetuned_classes: int | None = None,
           step: float = 0.2) -> tuple[dict, dict, dict]:
    """(θr, θA, θB): θA = θr + a large move, θB = θA + a small move, like real training.

    With `finetuned_classes`, θB's classifier ('fc', 'head' or 'classifier') gets a
    new number of outputs, as after replacing the head for a downstream task.
    """
    r = random_state(shapes, seed)
    a = {k: v + n if v.is_floating_point() else v
         for (k, v), n in zip(r.items(), random_state(shapes, seed + 1).values())}
    b = {k: v + step * n if v.is_floating_point() else v
         for (k, v), n in zip(a.items(), random_state(shapes, seed + 2).values())}
    if finetuned_classes is not None:
        heads = {name: (finetuned_classes, *shapes[name][1:]) for name in shapes
                 if name.rpartition(".")[0] in ("fc", "head", "classifier")}
        b.update(random_state(heads, seed + 3))
    return r, a, b
