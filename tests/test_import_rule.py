"""The package's one import rule, read from the source: a module imports only leftwards in

    errors <- ops <- io <- measure <- train <- report <- pipelines <- cli

(same layer allowed). The one exception: a method named `plot` of a result in measure/ or
train/ may import report/ inside its body, so that `result.plot(path)` stays a one-liner.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "transfer_fast"
LAYERS = ["errors", "ops", "io", "measure", "train", "report", "pipelines", "cli"]
# Entry points and test helpers sit above everything.
UNLAYERED = {"__init__", "__main__", "testing"}


def layer_of(module: str) -> str | None:
    """'measure.plan' -> 'measure'; '_C' (the compiled library) -> 'ops'."""
    head = module.split(".")[0]
    if head == "_C":
        return "ops"
    return None if head in UNLAYERED else head


def resolve(importer: str, node: ast.ImportFrom) -> list[str]:
    """Absolute module names (relative to the package) that an import statement reaches."""
    if node.level == 0:
        if not (node.module or "").startswith("transfer_fast"):
            return []
        base = node.module.split(".")[1:]
    else:
        package = importer.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)] + (node.module or "").split(".")
        base = [b for b in base if b]
    if node.module is None or not base:  # `from . import x, y`: each name is a module
        return [".".join([*base, a.name]) for a in node.names]
    return [".".join(base)]


def imports(path: Path):
    """(imported module, enclosing function name or None, line) for every package import."""
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    tree = ast.parse(path.read_text())

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                walk(child, child.name)
            elif isinstance(child, ast.ImportFrom):
                for target in resolve(module, child):
                    yield target, function, child.lineno
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("transfer_fast."):
                        yield a.name.split(".", 1)[1], function, child.lineno
            else:
                yield from walk(child, function)

    return module, list(walk(tree, None))


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_leftwards(path):
    module, found = imports(path)
    own = layer_of(module)
    if own is None:
        return
    for target, function, line in found:
        other = layer_of(target)
        if other is None or LAYERS.index(other) <= LAYERS.index(own):
            continue
        allowed = function == "plot" and own in ("measure", "train") and other == "report"
        assert allowed, (f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {target} "
                         f"({other}): imports must point leftwards in {' <- '.join(LAYERS)}")


def test_no_module_of_measure_or_train_imports_matplotlib_at_module_level():
    for path in modules():
        module = ".".join(path.relative_to(PACKAGE).parts)
        if layer_of(module) not in ("ops", "io", "measure", "train"):
            continue
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("matplotlib") for n in names), path


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a measure module importing a pipeline is flagged."""
    tree = ast.parse("from ..pipelines.scan import scan\n")
    node = tree.body[0]
    assert resolve("measure.plan", node) == ["pipelines.scan"]
    assert LAYERS.index(layer_of("pipelines.scan")) > LAYERS.index(layer_of("measure.plan"))
