"""Packaging: what a wheel ships and what it depends on, read from the sources.

The wheel itself takes minutes to build (the C++ kernels): that test runs only with
TRANSFER_FAST_TEST_WHEEL=1. The others read setup.py, pyproject.toml and the
requirements files as text (setup.py is never executed) and the package's imports
with ast, so they are fast.
"""

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import transfer_fast
from transfer_fast.pipelines.experiment_config import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "transfer_fast"
# Import names whose distribution is called otherwise.
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}
# Imported only by the code that needs them, with a clear message when missing.
OPTIONAL = {"scikit-learn": "demo"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0].lower()


def third_party_imports() -> dict[str, set[str]]:
    """{distribution: files importing it} over the package's absolute imports."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "transfer_fast":
                    continue
                dist = DISTRIBUTION.get(top, top).lower()
                found.setdefault(dist, set()).add(str(path.relative_to(ROOT)))
    return found


def test_dependencies_are_exactly_the_packages_imported():
    project = pyproject()["project"]
    declared = {requirement_name(d) for d in project["dependencies"]}
    imported = third_party_imports()
    required = set(imported) - set(OPTIONAL)
    assert declared == required, (f"declared but never imported: {declared - required}; "
                                  f"imported but not declared: {required - declared}")
    assert "scipy" not in declared
    extras = project["optional-dependencies"]
    for dist, extra in OPTIONAL.items():
        assert dist in {requirement_name(d) for d in extras[extra]}
    # tomli is the Python 3.10 stand-in for tomllib: only declared for those versions.
    assert any(d.startswith("tomli") and "python_version < '3.11'" in d
               for d in project["dependencies"])


def requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [x.split("#")[0].strip() for x in lines if x.split("#")[0].strip()]


def test_runtime_and_development_pins_are_apart():
    runtime = requirements("requirements.txt")
    declared = {requirement_name(d) for d in pyproject()["project"]["dependencies"]}
    assert {requirement_name(r) for r in runtime} == declared
    assert "torch==2.13.0" in runtime
    assert all("==" in r for r in runtime), "runtime requirements are pinned"
    dev = requirements("requirements-dev.txt")
    assert dev[0] == "-r requirements.txt"
    dev_names = {requirement_name(r) for r in dev[1:]}
    assert {"pytest", "pytest-benchmark", "ruff", "scikit-learn", "scipy", "ninja",
            "setuptools", "wheel"} <= dev_names
    assert not dev_names & declared, "runtime pins live in requirements.txt only"
    assert "pip install -q -r requirements-dev.txt" in (ROOT / "Makefile").read_text()


def setup_package_data() -> dict:
    """PACKAGE_DATA as setup.py assigns it (read, not run: setup.py probes compilers)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PACKAGE_DATA"
                                                for t in node.targets):
            data = ast.literal_eval(node.value)
            break
    else:
        pytest.fail("setup.py assigns no PACKAGE_DATA")
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    assert any(k.arg == "package_data" and getattr(k.value, "id", "") == "PACKAGE_DATA"
               for k in call.keywords), "setup() is not given PACKAGE_DATA"
    return data


def test_wheel_ships_the_type_marker_and_the_build_record():
    data = setup_package_data()
    assert {"py.typed", "_build_info.json"} <= set(data["transfer_fast"])
    assert (PACKAGE / "py.typed").is_file()
    assert "_build_info.json" in (ROOT / "setup.py").read_text()  # written before the build


def test_version_has_one_source():
    project = pyproject()
    assert "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "transfer_fast.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", transfer_fast.__version__)


@pytest.mark.skipif(os.environ.get("TRANSFER_FAST_TEST_WHEEL") != "1",
                    reason="builds the C++ extension (minutes): TRANSFER_FAST_TEST_WHEEL=1")
def test_a_built_wheel_installs_and_reports_its_build(tmp_path):
    """`pip wheel .` then a non-editable install: `transfer-fast info` is complete."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, timeout=1800)
    wheel = next((tmp_path / "dist").glob("transfer_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("py.typed", "_build_info.json", "cli/__init__.py", "cli/parser.py",
                   "io/data_stream.py"):
        assert f"transfer_fast/{member}" in names, member
    assert any(re.fullmatch(r"transfer_fast/_C\..*so", n) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = [sys.executable, str(target / "bin" / "transfer-fast")]
    info = subprocess.run([*script, "info"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=True).stdout
    assert f"transfer_fast {transfer_fast.__version__}" in info
    assert "compiled      loaded" in info and "built with    torch" in info
    where = subprocess.run([sys.executable, "-c", "import transfer_fast; print("
                            "transfer_fast.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))  # the installed copy, not the source tree
