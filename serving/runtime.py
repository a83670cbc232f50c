"""Load shipped models through their contract (``models/README.md``) into onnxruntime sessions.

Torch-free: onnxruntime, json and hashlib only. Everything that can be wrong with a model directory
(missing or unreadable JSON, wrong task, ONNX file missing, corrupt or not the one the JSON's sha256
names, inputs that disagree with the contract) raises ``ModelError`` naming the file, so the service
refuses to start instead of answering requests with a broken model.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("bentoml.roadsight")

SCHEMA = "roadsight.model/1"
MODEL_FILES = {"classify": "vehicle_classifier.json", "dehaze": "dehazer.json"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
_ORT_DTYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


class ModelError(RuntimeError):
    """A shipped model that cannot be served; the message names the file."""


@dataclass
class LoadedModel:
    task: str
    json_path: Path
    onnx_path: Path
    contract: dict
    sha256: str
    session: object  # onnxruntime.InferenceSession
    provider: str
    input_name: str
    output_name: str
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        contract = self.contract
        info = {"name": contract.get("name"), "task": self.task, "file": self.onnx_path.name,
                "version": self.sha256, "sha256": self.sha256, "provider": self.provider,
                "input": contract["input"], "output": contract["output"],
                "exported_at": contract.get("exported_at"), "opset": contract.get("opset"),
                "metrics": contract.get("metrics", {})}
        if self.task == "classify":
            info["labels"] = list(contract["labels"])
        else:
            info["pad_multiple"] = int(contract.get("pad_multiple", 1))
        return info


def default_models_dir() -> Path:
    """``$ROADSIGHT_MODELS_DIR`` or the repository's (and the bento's) ``models/``."""
    configured = os.environ.get("ROADSIGHT_MODELS_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "models"


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Cores this container's CPU quota allows (docker --cpus), from cgroup v2's cpu.max or, on hosts
    still on cgroup v1, the CFS files; None when there is no quota."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # "max 100000" when unlimited
    except OSError:
        try:
            quota, period = ((cgroup / "cpu" / name).read_text().strip()  # quota -1 when unlimited
                             for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        except OSError:
            return None
    try:
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except ValueError:
        return None


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by its CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cpu_layout(cores: int, parallel: int = 0, threads: int = 0) -> tuple[int, int]:
    """How a worker with ``cores`` CPU cores runs each model on the CPU: (onnxruntime runs at once,
    intra-op threads of each run). ``parallel`` and ``threads`` override the choice when positive
    (ROADSIGHT_PARALLEL_RUNS, ROADSIGHT_INTRA_OP_THREADS). By default two runs of half the cores
    each: on 2 cores, two 1-thread runs side by side served /classify 4-15% and /dehaze 12-30% faster
    than one 2-thread run, whose threads stall each other whenever request handling takes one of the
    cores (benchmarks/README.md)."""
    runs = parallel if parallel > 0 else min(2, cores)
    return runs, threads if threads > 0 else max(1, cores // runs)


def limit_malloc_arenas(count: int = 2) -> bool:
    """At most ``count`` glibc malloc arenas in this process from now on (mallopt M_ARENA_MAX), unless
    MALLOC_ARENA_MAX says otherwise. glibc gives threads up to eight arenas per core, each keeping what
    its threads freed: with the worker's request threads and its short-lived buffers (uploads, decoded
    images, answers) resident memory crept upwards for minutes under load (the soak, benchmarks/README.md).
    False where it was not applied (the variable set, or no glibc)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, count) == 1  # -8: M_ARENA_MAX in glibc's malloc.h
    except (OSError, AttributeError):
        return False


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_contract(json_path: Path, task: str) -> tuple[dict, Path, str]:
    """The parsed, checked JSON, its ONNX file and that file's sha256."""
    if not json_path.is_file():
        raise ModelError(f"model metadata {json_path} is missing (expected {MODEL_FILES[task]} beside its .onnx "
                         f"file; set ROADSIGHT_MODELS_DIR to serve another directory)")
    try:
        contract = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model metadata {json_path} is not readable JSON: {exc}") from exc
    if not isinstance(contract, dict):
        raise ModelError(f"model metadata {json_path} is not a JSON object")
    problems = []
    if contract.get("schema") != SCHEMA:
        problems.append(f"schema is {contract.get('schema')!r}, expected {SCHEMA!r}")
    if contract.get("task") != task:
        problems.append(f"task is {contract.get('task')!r}, expected {task!r}")
    for key in ("file", "sha256", "input", "output"):
        if key not in contract:
            problems.append(f"field {key!r} is missing")
    spec = contract.get("input") if isinstance(contract.get("input"), dict) else {}
    if not spec.get("name") or not isinstance(contract.get("output"), dict) or not contract["output"].get("name"):
        problems.append("input/output names are missing")
    if task == "classify":
        labels = contract.get("labels")
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            problems.append("'labels' must be a non-empty list of names")
        for key in ("height", "width"):
            if not (isinstance(spec.get(key), int) and spec.get(key, 0) > 0):
                problems.append(f"input.{key} must be a positive integer")
        if spec.get("resize", "stretch") != "stretch" or spec.get("filter", "bilinear") not in ("bilinear", "bicubic"):
            problems.append(f"unsupported resize rule {spec.get('resize')!r}/{spec.get('filter')!r}")
        if spec.get("dtype", "uint8") != "uint8":
            problems.append(f"input dtype {spec.get('dtype')!r} is not uint8")
    else:
        multiple = contract.get("pad_multiple", 1)
        if not (isinstance(multiple, int) and multiple >= 1):
            problems.append(f"pad_multiple must be a positive integer, not {multiple!r}")
        if contract.get("pad_mode", "reflect") != "reflect":
            problems.append(f"pad_mode {contract.get('pad_mode')!r} is not supported (reflect only)")
        if spec.get("dtype", "float32") != "float32":
            problems.append(f"input dtype {spec.get('dtype')!r} is not float32")
    if problems:
        raise ModelError(f"model metadata {json_path} breaks the contract: " + "; ".join(problems))
    onnx_path = json_path.parent / contract["file"]
    if not onnx_path.is_file():
        raise ModelError(f"model file {onnx_path} named by {json_path} is missing")
    digest = sha256_of(onnx_path)
    if digest != contract["sha256"]:
        raise ModelError(f"model file {onnx_path} does not match {json_path.name}: sha256 {digest} != "
                         f"{contract['sha256']} (corrupt, or replaced without re-exporting its JSON)")
    return contract, onnx_path, digest


def gpu_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def _provider_lists(preference: str, task: str) -> list[list]:
    """Provider lists to try in order (the last is always CPU alone)."""
    cuda = ("CUDAExecutionProvider", {"device_id": int(os.environ.get("ROADSIGHT_CUDA_DEVICE", "0"))})
    attempts: list[list] = []
    if preference == "tensorrt" and task == "classify":
        cache = os.environ.get("ROADSIGHT_TRT_CACHE", "/tmp/roadsight-trt")
        trt = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                             "trt_fp16_enable": os.environ.get("ROADSIGHT_TRT_FP16", "0") == "1"})
        attempts.append([trt, cuda, "CPUExecutionProvider"])
    elif preference in ("auto", "cuda", "tensorrt"):
        attempts.append([cuda, "CPUExecutionProvider"])
    attempts.append(["CPUExecutionProvider"])
    return attempts


def create_session(onnx_path: Path, task: str, threads: int, preference: str = "auto", arena: bool = True):
    """An InferenceSession on the best usable provider and the provider's name.

    The GPU is used when a session created with CUDA (or TensorRT, when asked for) really runs on it,
    as ``session.get_providers()`` reports; ``get_available_providers()`` alone lists CUDA on any
    machine with onnxruntime-gpu installed. ``preference`` "cuda"/"tensorrt" make a CPU fallback an error.
    """
    import onnxruntime as ort

    if preference not in PROVIDER_CHOICES:
        raise ModelError(f"ROADSIGHT_PROVIDER={preference!r} is not one of {', '.join(PROVIDER_CHOICES)}")
    ort.set_default_logger_severity(3)  # warnings and info off; errors only
    compiled = set(ort.get_available_providers())
    has_gpu = gpu_present()
    if preference != "cpu" and "CUDAExecutionProvider" in compiled and has_gpu:
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed
        except Exception as exc:  # pragma: no cover - depends on the GPU machine
            log.debug("onnxruntime.preload_dlls() failed: %s", exc)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs: no busy-waiting
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena  # off: memory goes back to the system after each run
    last_error: Exception | None = None
    for providers in _provider_lists(preference, task):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if any(name not in compiled for name in names):
            continue
        # Without an NVIDIA device the CUDA attempt can only fail: keep its library-load error quiet too.
        quiet = names != ["CPUExecutionProvider"] and not has_gpu and preference == "auto"
        ort.set_default_logger_severity(4 if quiet else 3)
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:
            last_error = exc
            if names == ["CPUExecutionProvider"]:
                raise ModelError(f"model file {onnx_path} cannot be loaded by onnxruntime: {exc}") from exc
            continue
        finally:
            ort.set_default_logger_severity(3)
        active = session.get_providers()[0]  # what it really runs on: CUDA falls back to CPU silently
        break
    else:  # pragma: no cover - the CPU provider is always compiled in
        raise ModelError(f"model file {onnx_path} cannot be loaded by onnxruntime: {last_error}")
    if active == "CPUExecutionProvider" and has_gpu and preference != "cpu":
        log.warning("an NVIDIA device is present but %s runs on the CPU: onnxruntime could not use CUDA "
                    "(onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9 libraries)", onnx_path.name)
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider" if task == "classify"
              else "CUDAExecutionProvider"}.get(preference)
    if wanted and active != wanted:
        raise ModelError(f"ROADSIGHT_PROVIDER={preference} but {onnx_path.name} runs on {active} "
                         f"(no usable GPU, or CUDA 13 / cuDNN 9 libraries missing)")
    return session, active


def _check_io(session, contract: dict, json_path: Path, task: str) -> tuple[str, str]:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    spec, out = contract["input"], contract["output"]
    by_name = {i.name: i for i in inputs}
    problems = []
    if spec["name"] not in by_name:
        problems.append(f"graph has no input {spec['name']!r} (it has {[i.name for i in inputs]})")
    elif len(inputs) != 1:
        problems.append(f"graph takes {len(inputs)} inputs, the service feeds one")
    if out["name"] not in {o.name for o in outputs}:
        problems.append(f"graph has no output {out['name']!r} (it has {[o.name for o in outputs]})")
    if not problems:
        node = by_name[spec["name"]]
        dtype = spec.get("dtype", "uint8" if task == "classify" else "float32")
        if node.type != _ORT_DTYPES.get(dtype):
            problems.append(f"input {node.name} is {node.type}, the contract says {dtype}")
        shape = list(node.shape)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            problems.append(f"input {node.name} has shape {shape}, expected [N, 3, H, W]")
        elif task == "classify":
            for axis, key in ((2, "height"), (3, "width")):
                if isinstance(shape[axis], int) and shape[axis] != spec[key]:
                    problems.append(f"input {node.name} has {key} {shape[axis]}, the contract says {spec[key]}")
            classes = next(o for o in outputs if o.name == out["name"]).shape
            if len(classes) == 2 and isinstance(classes[1], int) and classes[1] != len(contract["labels"]):
                problems.append(f"output has {classes[1]} classes for {len(contract['labels'])} labels")
    if problems:
        raise ModelError(f"model file {json_path.parent / contract['file']} disagrees with {json_path.name}: "
                         + "; ".join(problems))
    return spec["name"], out["name"]


def load_model(models_dir: Path, task: str, threads: int, preference: str = "auto") -> LoadedModel:
    json_path = Path(models_dir) / MODEL_FILES[task]
    contract, onnx_path, digest = read_contract(json_path, task)
    session, provider = create_session(onnx_path, task, threads, preference)
    input_name, output_name = _check_io(session, contract, json_path, task)
    log.info("loaded %s (%s, sha256 %s) on %s with %d intra-op threads", onnx_path, contract.get("name"),
             digest[:12], provider, threads)
    return LoadedModel(task, json_path, onnx_path, contract, digest, session, provider, input_name, output_name)


class SessionPool:
    """A model's onnxruntime sessions, one per run that may go on at once (the batcher's ``parallel``).

    An onnxruntime CPU session keeps a memory arena that grows to what its runs needed and keeps it.
    Runs sharing one session interleave their allocations in one arena, which fragments, and a session
    whose runs grow bit by bit adds region after region: under a varied load the worker's memory crept
    upwards in steps for minutes (the soak, benchmarks/README.md). Here each run at once has its own
    session, warmed up at start-up with the largest run it will get (``warm_up``), so its arena is laid
    out once for every later run and the worker's memory is what it holds when ready. A run costing more
    than ``max_run_cost`` (one image over the batcher's per-run bound) goes to ``spill``, a session
    without an arena that hands its memory back when the run ends, so a rare large image leaves nothing
    behind; it pays for fresh pages (about a quarter slower on this CPU), no other run does.
    The runs side by side have a share of the cores each, which an idle service does not need: a run of
    one item that its caller says is ``alone`` (the only request being served) takes ``solo``, a session
    with all of them, when no other run goes on, so a lone request is answered as fast as the CPU allows
    (in a pool with ``max_run_cost`` it has no arena either, and takes a lone image of any size). A run
    that starts meanwhile waits for it (one image's run) rather than share its cores.
    """

    def __init__(self, model: LoadedModel, sessions: list, max_run_cost: int | None = None, spill=None,
                 solo=None):
        if (max_run_cost is None) != (spill is None):
            raise ValueError("max_run_cost and spill go together")
        self.model = model
        self.sessions = list(sessions)
        self.max_run_cost, self.spill, self.solo = max_run_cost, spill, solo
        self._idle = list(self.sessions)
        self._solo_running = False
        self._solo_done = threading.Condition()

    @contextlib.contextmanager
    def lease(self, cost: int = 0, items: int = 1, alone: bool = False):
        """The session for one run of ``items`` costing ``cost``, the caller's until the block ends: the
        solo session for one item ``alone`` while no other run goes on, else the spill session for a run
        over ``max_run_cost``, else the most recently used idle session."""
        with self._solo_done:
            self._solo_done.wait_for(lambda: not self._solo_running)
            if self.solo is not None and alone and items == 1 and len(self._idle) == len(self.sessions):
                self._solo_running, session = True, self.solo
            elif self.max_run_cost is not None and cost > self.max_run_cost:
                session = self.spill
            elif self._idle:
                session = self._idle.pop()
            else:
                raise RuntimeError(f"more runs at once than the {len(self.sessions)} sessions of this pool")
        try:
            yield session
        finally:
            with self._solo_done:
                if session is self.solo:
                    self._solo_running = False
                    self._solo_done.notify_all()
                elif session is not self.spill:
                    self._idle.append(session)

    @property
    def solo_threads(self) -> int | None:
        """The solo session's intra-op threads; None without one."""
        return None if self.solo is None else self.solo.get_session_options().intra_op_num_threads

    def run(self, batch, cost: int = 0, alone: bool = False):
        """The model's output for ``batch`` (of ``cost``), in the session ``lease`` gives."""
        with self.lease(cost, len(batch), alone) as session:
            (output,) = session.run([self.model.output_name], {self.model.input_name: batch})
            return output

    def warm_up(self, batch) -> None:
        """``batch`` through every pooled session (and the solo one, for a batch of one): first-run
        set-up done, and each arena laid out for it."""
        for session in self.sessions + ([self.solo] if self.solo is not None and len(batch) == 1 else []):
            session.run([self.model.output_name], {self.model.input_name: batch})


def session_pool(model: LoadedModel, runs: int, threads: int, max_run_cost: int | None = None,
                 solo_threads: int | None = None) -> SessionPool:
    """``runs`` sessions of ``model`` (its own and copies with the same options); with
    ``max_run_cost`` an arena-less spill session for runs above it; with ``solo_threads`` (more than
    ``threads``) a session of that many threads for a lone run of one item (arena-less too where runs
    are bounded, so that it holds no memory between lone requests). Runs side by side, arena bounds
    and the solo session are a CPU layout (a GPU runs one model's work at a time, in its own memory):
    on a GPU a pool takes one run and has no solo session."""
    on_cpu = model.provider == "CPUExecutionProvider"
    if (runs > 1 or max_run_cost is not None) and not on_cpu:
        raise ModelError(f"{model.onnx_path.name} runs on {model.provider}: one pooled run at a time there")
    copies = [create_session(model.onnx_path, model.task, threads, "cpu")[0] for _ in range(runs - 1)]
    spill = (None if max_run_cost is None
             else create_session(model.onnx_path, model.task, threads, "cpu", arena=False)[0])
    solo = (create_session(model.onnx_path, model.task, solo_threads, "cpu", arena=max_run_cost is None)[0]
            if on_cpu and solo_threads and solo_threads > threads else None)
    return SessionPool(model, [model.session, *copies], max_run_cost, spill, solo)


def check_models(models_dir: Path) -> list[Path]:
    """Check every shipped model as the service will load it (contract, sha256, onnxruntime on the
    CPU, inputs/outputs) without keeping anything; raise ``ModelError`` naming the first bad file."""
    checked = []
    for task in MODEL_FILES:
        json_path = Path(models_dir) / MODEL_FILES[task]
        contract, onnx_path, _ = read_contract(json_path, task)
        session, _ = create_session(onnx_path, task, 1, "cpu")
        _check_io(session, contract, json_path, task)
        checked.append(onnx_path)
    return checked
