"""`bentoml build` of bentofile.yaml (GPU) and bentofile-cpu.yaml: both build offline, their images
install what serving imports and nothing to compile with, and the two differ only in onnxruntime.
Building and running the images themselves is `make container` / `make container-check` (opt-in)."""
import ast
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

BENTOFILES = {"gpu": "bentofile.yaml", "cpu": "bentofile-cpu.yaml"}
RUNTIMES = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime"}
EXTRAS = {"gpu": "serve", "cpu": "serve-cpu"}  # pyproject.toml's extras for the same serving install


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


@pytest.fixture(scope="module", params=sorted(BENTOFILES))
def flavor(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def bento(tmp_path_factory, flavor):
    home = tmp_path_factory.mktemp(f"bentoml-home-{flavor}")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uv from the venv
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", BENTOFILES[flavor], "-o", "tag"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name, version = re.search(r"__tag__:(\S+)", result.stdout).group(1).split(":")
    return home / "bentos" / name / version


def requirements_of(bento: Path) -> dict[str, str]:
    """The bento's requirements by distribution name, as written."""
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    return {dist_name(line): line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_the_bento_has_a_dockerfile_that_installs_its_requirements(bento):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "./env/python/install.sh" in dockerfile
    assert "requirements.txt" in (bento / "env" / "python" / "install.sh").read_text()
    assert "ENV ORT_DISABLE_TELEMETRY" in dockerfile and "ENV BENTOML_DO_NOT_TRACK" in dockerfile
    assert "EXPOSE 3000" in dockerfile


def dockerfile_instructions(bento: Path) -> list[tuple[str, str]]:
    """(keyword, arguments) of each instruction of the bento's Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (bento / "env" / "docker" / "Dockerfile").read_text())
    return [tuple(line.split(maxsplit=1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_image_has_no_build_tools_runs_as_non_root_and_has_a_health_check(bento):
    instructions = dockerfile_instructions(bento)
    assert [args for keyword, args in instructions if keyword == "FROM"] == ["python:3.11-slim as base-container"]
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    for tool in ("apt-get", "build-essential", "gcc", "git", "curl", "uv"):
        assert not re.search(rf"\b{tool}\b", runs), f"the runtime image would get {tool}: {runs}"
    keywords = [keyword for keyword, _ in instructions]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert instructions[last_user][1] not in ("root", "0") and "RUN" not in keywords[last_user:]
    (health,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert "/readyz" in health and "CMD" in health
    assert keywords[-1] == "ENTRYPOINT"


def test_the_bento_installs_what_serving_imports_and_no_torch(bento, flavor):
    requirements = set(requirements_of(bento))
    assert {"bentoml", RUNTIMES[flavor], "pillow", "numpy"} <= requirements
    assert not requirements & {"torch", "torchvision", "mlflow", "timm", "onnx"}
    assert not requirements & (set(RUNTIMES.values()) - {RUNTIMES[flavor]}), "both onnxruntime packages"
    if flavor == "cpu":  # neither onnxruntime-gpu's [cuda,cudnn] extras nor any other CUDA wheel
        assert "[" not in requirements_of(bento)["onnxruntime"] and not any(r.startswith("nvidia") for r in requirements)
    provided = installed_closure(requirements)
    distributions = metadata.packages_distributions()
    for module in serving_imports():
        owners = {dist_name(d) for d in distributions.get(module, [module])}
        if owners & set(RUNTIMES.values()):  # either package provides the onnxruntime module
            owners |= set(RUNTIMES.values())
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


def test_the_two_bentofiles_differ_only_in_name_and_onnxruntime():
    gpu, cpu = (yaml.safe_load((REPO / BENTOFILES[f]).read_text()) for f in ("gpu", "cpu"))
    assert (gpu["name"], cpu["name"]) == ("roadsight", "roadsight-cpu")

    def without_runtime(config):
        packages = [p for p in config["python"]["packages"] if not dist_name(p).startswith("onnxruntime")]
        return {**config, "name": None, "python": {**config["python"], "packages": packages}}

    assert without_runtime(gpu) == without_runtime(cpu)


def test_the_bentofiles_pin_what_pyproject_pins():
    """pyproject.toml's serve extras are the one place for the serving versions: `make serve` and the
    images run the same bentoml and onnxruntime."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for flavor, bentofile in BENTOFILES.items():
        pinned = {dist_name(p): p.split("==")[1] for p in extras[EXTRAS[flavor]] if "==" in p}
        packages = yaml.safe_load((REPO / bentofile).read_text())["python"]["packages"]
        versions = {dist_name(p): p.split("==")[1] for p in packages if "==" in p}
        assert {"bentoml", RUNTIMES[flavor]} <= set(pinned)
        assert {name: versions.get(name) for name in pinned} == pinned, bentofile


def test_the_container_checks_reference_answer():
    """`make container-check` holds the image's /classify to this in-process answer of models/."""
    from benchmarks.container_check import in_process_classification

    answer = in_process_classification(REPO / "tests" / "data" / "vehicles" / "car" / "car001.jpg")
    assert answer["label"] == "car" and abs(sum(answer["probabilities"].values()) - 1) < 1e-4
