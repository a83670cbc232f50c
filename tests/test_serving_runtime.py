"""Loading models through their contract: providers, and start-up refusing bad model directories."""
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import REPO
from serving import runtime
from serving.runtime import ModelError
from standin_models import write_standin_models


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return write_standin_models(tmp_path_factory.mktemp("standin-models"))


@pytest.fixture
def models(standins, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(standins, target)
    return target


def edit_json(path, **changes):
    contract = json.loads(path.read_text())
    contract.update(changes)
    path.write_text(json.dumps(contract))


def test_loads_both_models_and_reports_the_provider(standins):
    classifier = runtime.load_model(standins, "classify", threads=1)
    dehazer = runtime.load_model(standins, "dehaze", threads=1)
    assert classifier.provider == classifier.session.get_providers()[0]
    assert dehazer.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    info = classifier.describe()
    assert info["labels"] == ["bus", "car", "truck"] and info["version"] == runtime.sha256_of(classifier.onnx_path)
    assert dehazer.describe()["pad_multiple"] == 8
    assert runtime.check_models(standins) == [standins / "vehicle_classifier.onnx", standins / "dehazer.onnx"]


def break_missing_json(models):
    (models / "dehazer.json").unlink()
    return "dehazer.json is missing"


def break_invalid_json(models):
    (models / "vehicle_classifier.json").write_text("{not json")
    return "vehicle_classifier.json is not readable JSON"


def break_missing_onnx(models):
    (models / "dehazer.onnx").unlink()
    return "dehazer.onnx named by .*dehazer.json is missing"


def break_sha(models):
    with open(models / "vehicle_classifier.onnx", "ab") as handle:
        handle.write(b"\0")
    return "vehicle_classifier.onnx does not match vehicle_classifier.json: sha256"


def break_onnx_content(models):
    onnx_path = models / "dehazer.onnx"
    onnx_path.write_bytes(b"this is not a protobuf" * 10)
    edit_json(models / "dehazer.json", sha256=runtime.sha256_of(onnx_path))
    return "dehazer.onnx cannot be loaded by onnxruntime"


def break_task(models):
    edit_json(models / "vehicle_classifier.json", task="dehaze")
    return "task is 'dehaze', expected 'classify'"


def break_labels(models):
    edit_json(models / "vehicle_classifier.json", labels=["bus", "car", "truck", "van"])
    return "output has 3 classes for 4 labels"


def break_size(models):
    contract = json.loads((models / "vehicle_classifier.json").read_text())
    edit_json(models / "vehicle_classifier.json", input={**contract["input"], "height": 41})
    return "has height 40, the contract says 41"


def break_input_name(models):
    contract = json.loads((models / "dehazer.json").read_text())
    edit_json(models / "dehazer.json", input={**contract["input"], "name": "image"})
    return "graph has no input 'image'"


@pytest.mark.parametrize("breaker", [break_missing_json, break_invalid_json, break_missing_onnx, break_sha,
                                     break_onnx_content, break_task, break_labels, break_size, break_input_name])
def test_a_bad_model_directory_is_refused_naming_the_file(models, breaker):
    expected = breaker(models)
    with pytest.raises(ModelError, match=expected):
        runtime.check_models(models)


def test_provider_preferences(standins, monkeypatch):
    with pytest.raises(ModelError, match="not one of auto, cpu, cuda, tensorrt"):
        runtime.load_model(standins, "classify", 1, preference="gpu")
    assert runtime.load_model(standins, "classify", 1, preference="cpu").provider == "CPUExecutionProvider"
    if runtime.gpu_present():
        pytest.skip("an NVIDIA device is present; a CUDA-or-fail request may legitimately succeed")
    with pytest.raises(ModelError, match="ROADSIGHT_PROVIDER=cuda but vehicle_classifier.onnx runs on CPU"):
        runtime.load_model(standins, "classify", 1, preference="cuda")


def test_cores_and_models_dir(monkeypatch, tmp_path):
    assert 1 <= runtime.available_cores() <= (os.cpu_count() or 1)
    assert runtime.cpu_quota(tmp_path) is None  # no cgroup files: no quota
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime.cpu_quota(tmp_path) is None  # cgroup v1, unlimited
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert runtime.cpu_quota(tmp_path) == 1.0  # cgroup v1, docker --cpus 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cpu_quota(tmp_path) is None  # cgroup v2 is read first: unlimited
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runtime.cpu_quota(tmp_path) == 1.5  # docker --cpus 1.5
    monkeypatch.setenv("ROADSIGHT_MODELS_DIR", str(tmp_path))
    assert runtime.default_models_dir() == tmp_path
    monkeypatch.delenv("ROADSIGHT_MODELS_DIR")
    assert runtime.default_models_dir() == REPO / "models"


def test_cpu_layout_runs_two_halves_by_default_and_takes_the_settings():
    assert runtime.cpu_layout(1) == (1, 1)
    assert runtime.cpu_layout(2) == (2, 1)  # this machine: two 1-thread runs side by side
    assert runtime.cpu_layout(16) == (2, 8)
    assert runtime.cpu_layout(2, parallel=1) == (1, 2)  # one run with both cores
    assert runtime.cpu_layout(8, parallel=4) == (4, 2)
    assert runtime.cpu_layout(8, parallel=3, threads=1) == (3, 1)


def test_serving_never_imports_torch(standins):
    code = ("import sys; import serving.service as s; svc = s.Roadsight.inner(); "
            "assert svc.classifier.session and svc.dehazer.session; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'mlflow', 'training')); "
            "assert not bad, bad; print('torch-free')")
    env = {**os.environ, "ROADSIGHT_MODELS_DIR": str(standins), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "torch-free" in result.stdout, result.stderr[-3000:]


def test_a_session_pool_gives_each_run_at_once_its_own_session_and_spills_large_runs(standins):
    dehazer = runtime.load_model(standins, "dehaze", threads=1, preference="cpu")
    pool = runtime.session_pool(dehazer, runs=2, threads=1, max_run_cost=100)
    assert len(pool.sessions) == 2 and pool.sessions[0] is dehazer.session
    with pool.lease(60) as first, pool.lease(100) as second:
        assert first is not second and pool.spill not in (first, second)  # two runs at once, two arenas
        with pytest.raises(RuntimeError, match="more runs at once than the 2 sessions"):
            with pool.lease(1):
                pass
        with pool.lease(101) as large:  # over the per-run bound: the arena-less session, even now
            assert large is pool.spill
    with pool.lease(50) as session:
        assert session is first  # the session idle last comes first: a light load keeps to one arena
    hazy = np.random.default_rng(0).random((1, 3, 16, 24), dtype=np.float32)
    expected = dehazer.session.run([dehazer.output_name], {dehazer.input_name: hazy})[0]
    np.testing.assert_array_equal(pool.run(hazy, cost=10**6), expected)  # the spill session answers the same


def test_a_lone_run_of_one_item_gets_the_solo_session_with_every_core(standins):
    classifier = runtime.load_model(standins, "classify", threads=1, preference="cpu")
    pool = runtime.session_pool(classifier, runs=2, threads=1, solo_threads=2)
    assert pool.solo is not None and pool.solo not in pool.sessions
    leased, waiting = [], threading.Event()

    def second_run():
        waiting.set()
        with pool.lease(items=1, alone=True) as session:
            leased.append(session)

    with pool.lease(items=1) as shared:
        assert shared in pool.sessions  # a request among others: a share of the cores
    with pool.lease(items=1, alone=True) as lone:
        assert lone is pool.solo
        beside = threading.Thread(target=second_run)
        beside.start()
        waiting.wait()
        beside.join(0.2)
        assert beside.is_alive() and not leased  # a run beside the solo one waits for its cores
    beside.join(5)
    assert leased == [pool.solo]  # then it is the lone run
    with pool.lease(items=2) as batch:
        assert batch in pool.sessions  # batches come from load: the cores are shared out
        with pool.lease(items=1, alone=True) as beside:
            assert beside in pool.sessions and beside is not batch
    with pool.lease(items=1, alone=True) as again:
        assert again is pool.solo  # given back
    image = np.random.default_rng(0).integers(0, 255, (1, 3, *classifier.session.get_inputs()[0].shape[2:]),
                                              dtype=np.uint8)
    expected = classifier.session.run([classifier.output_name], {classifier.input_name: image})[0]
    np.testing.assert_allclose(pool.run(image, alone=True), expected, atol=1e-6)  # the solo session answers the same
    assert runtime.session_pool(classifier, runs=2, threads=1, solo_threads=1).solo is None  # no more cores


def test_a_bounded_pool_has_an_arena_less_solo_session_for_a_lone_image_of_any_size(standins):
    dehazer = runtime.load_model(standins, "dehaze", threads=1, preference="cpu")
    pool = runtime.session_pool(dehazer, runs=2, threads=1, max_run_cost=100, solo_threads=2)
    assert not pool.solo.get_session_options().enable_cpu_mem_arena  # holds no memory between lone requests
    assert pool.sessions[0].get_session_options().enable_cpu_mem_arena
    with pool.lease(cost=500, alone=True) as lone:
        assert lone is pool.solo  # over the per-run bound, but alone: every core
    with pool.lease(cost=500) as shared:
        assert shared is pool.spill  # among other requests: the 1-thread spill session, as before
    with pool.lease(cost=50) as pooled:
        assert pooled in pool.sessions


def test_pooled_runs_are_refused_on_a_gpu_session(standins):
    classifier = runtime.load_model(standins, "classify", threads=1, preference="cpu")
    classifier.provider = "CUDAExecutionProvider"  # as loaded on a GPU machine
    with pytest.raises(ModelError, match="one pooled run at a time there"):
        runtime.session_pool(classifier, runs=2, threads=1)
    assert runtime.session_pool(classifier, runs=1, threads=1, solo_threads=2).solo is None  # no cores to share out


def test_malloc_arenas_are_limited_unless_the_environment_says_otherwise():
    script = "from serving import runtime; print(runtime.limit_malloc_arenas(2))"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    def applied(env):
        return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert applied(env) == "True"  # glibc (Linux): applied
    assert applied({**env, "MALLOC_ARENA_MAX": "4"}) == "False"  # the operator's own setting stands
