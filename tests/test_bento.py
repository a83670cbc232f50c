"""`bentoml build` of bentofile.yaml: it builds offline, and the image installs what serving imports."""
import ast
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def dist_name(requirement: str) -> str:
    return re.split(r"[\[=<>~!; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def serving_imports() -> set[str]:
    """Third-party top-level modules imported anywhere in serving/."""
    modules = set()
    for path in (REPO / "serving").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("serving", "__future__")}


def installed_closure(roots: set[str]) -> set[str]:
    """The distributions ``roots`` pull in (their non-extra requirements, recursively, as installed here)."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo.extend(dist_name(r) for r in requires if "extra ==" not in r)
    return seen


@pytest.fixture(scope="module")
def bento(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uv from the venv
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name, version = re.search(r"__tag__:(\S+)", result.stdout).group(1).split(":")
    return home / "bentos" / name / version


def test_the_bento_has_a_dockerfile_that_installs_its_requirements(bento):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile and "pip install" in dockerfile
    assert "ENV ORT_DISABLE_TELEMETRY" in dockerfile and "ENV BENTOML_DO_NOT_TRACK" in dockerfile
    assert "EXPOSE 3000" in dockerfile


def test_the_bento_installs_what_serving_imports_and_no_torch(bento):
    requirements = {dist_name(line) for line in (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")}
    assert {"bentoml", "onnxruntime-gpu", "pillow", "numpy"} <= requirements
    assert not requirements & {"torch", "torchvision", "mlflow", "timm", "onnx"}
    provided = installed_closure(requirements)
    distributions = metadata.packages_distributions()
    for module in serving_imports():
        owners = {dist_name(d) for d in distributions.get(module, [module])}
        assert owners & provided, f"serving imports {module} ({owners}) but the bento does not install it"
    assert "torch" not in provided


def test_the_bento_carries_serving_code_and_models_only(bento):
    src = bento / "src"
    assert {p.name for p in (src / "serving").glob("*.py")} >= {"service.py", "processing.py", "runtime.py", "images.py"}
    assert not (src / "training").exists() and not (src / "tests").exists()
    shipped = {p.name for p in (REPO / "models").iterdir() if p.suffix in (".onnx", ".json")}
    assert {p.name for p in (src / "models").iterdir() if p.suffix in (".onnx", ".json")} == shipped
    config = (bento / "bento.yaml").read_text()
    assert "service: serving.service:Roadsight" in config
