"""Training in two processes under torchrun (gloo, on the CPU) on the in-repo sample: one MLflow run,
metrics over the whole test part, the same first step as one process, checkpoints that resume at
either count, and Ctrl-C or a failing process ending every process."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from conftest import tiny_config, tiny_dehaze_config
from training.dehaze_engine import train_dehazer
from training.engine import train_classifier

TIMEOUT_S = 300  # a hung process group would otherwise hang the tests


def cli_arguments(cfg) -> list[str]:
    """The command-line flags that give ``cfg``."""
    flags = []
    for field in dataclasses.fields(cfg):
        value, flag = getattr(cfg, field.name), "--" + field.name.replace("_", "-")
        if value == field.default:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def torchrun(tmp_path, *arguments: str, script: tuple[str, ...] = ("-m", "training.cli")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *script, *arguments], cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def other_run(experiment: str, run_id: str) -> mlflow.entities.Run:
    """The one run of ``experiment`` besides ``run_id``."""
    (run,) = [r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")
              if r.info.run_id != run_id]
    return run


def history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key),
                                    key=lambda m: (m.step, m.timestamp))]


def test_two_processes_train_a_classifier_as_one_run_like_one_process_and_one_process_resumes_it(tmp_path,
                                                                                                   mlflow_store):
    # nothing drawn per process (augmentation, dropout) and no BatchNorm, whose statistics are taken over
    # each process's share of the batch: what is left must not depend on the process count. A linear
    # probe first (its feature pass shared by the processes), then two epochs.
    cfg = tiny_config(tmp_path, net="mlp", net_options={"hidden": [32], "pool_to": 8, "dropout": 0.0},
                      augment="none", schedule="constant", epochs=2, linear_probe_l2=1e-3)
    one = train_classifier(cfg)
    proc = torchrun(tmp_path, "train", "classify", *cli_arguments(cfg))
    assert proc.returncode == 0, proc.stderr
    two = other_run(cfg.experiment, one.run_id)  # one run for both processes
    assert two.info.status == "FINISHED"
    assert {k: two.data.params[k] for k in ("world_size", "backend", "batch_size_per_process")} == {
        "world_size": "2", "backend": "gloo", "batch_size_per_process": "4"}
    assert "2 process(es), cpu: global batch 8, 4 per process" in proc.stderr
    assert history(two.info.run_id, "train_step_loss")[0] == pytest.approx(history(one.run_id, "train_step_loss")[0],
                                                                           rel=1e-6)
    assert history(two.info.run_id, "train_loss") == pytest.approx(history(one.run_id, "train_loss"), rel=1e-4)
    for key in ("test_loss", "val_loss", "test_accuracy"):  # after the probe (step 0), each epoch, and at the end
        assert history(two.info.run_id, key) == pytest.approx(history(one.run_id, key), rel=1e-4), key
    report = mlflow.artifacts.load_dict(f"runs:/{two.info.run_id}/metrics/test_report.json")
    assert sum(map(sum, report["confusion_matrix"])) == int(two.data.params["data.test"])  # every test image

    checkpoint = tmp_path / "ckpt" / two.info.run_id / "last.pt"
    resumed = train_classifier(dataclasses.replace(cfg, epochs=3, resume=str(checkpoint)))
    assert resumed.run_id == two.info.run_id and mlflow.get_run(resumed.run_id).info.status == "FINISHED"
    assert history(resumed.run_id, "world_size") == [2, 2, 1]


def test_two_processes_train_the_dehazer_as_one_run_like_one_process_and_one_process_resumes_it(tmp_path,
                                                                                                mlflow_store):
    cfg = tiny_dehaze_config(tmp_path, epochs=1)
    one = train_dehazer(cfg)
    proc = torchrun(tmp_path, "train", "dehaze", *cli_arguments(cfg))
    assert proc.returncode == 0, proc.stderr
    two = other_run(cfg.experiment, one.run_id)
    assert two.info.status == "FINISHED" and two.data.params["batch_size_per_process"] == "2"
    # each process draws the whole global batch of crops and trains on its half
    assert history(two.info.run_id, "train_step_loss") == pytest.approx(history(one.run_id, "train_step_loss"),
                                                                        rel=1e-5)
    per_image = mlflow.artifacts.load_text(f"runs:/{two.info.run_id}/metrics/test_per_image.tsv").splitlines()[1:]
    assert [row.split("\t")[0] for row in per_image] == ["480.jpg", "520.jpg"]  # one scored by each process
    mean_psnr = sum(float(row.split("\t")[2]) for row in per_image) / len(per_image)
    assert two.data.metrics["test_psnr"] == pytest.approx(mean_psnr, abs=1e-3)
    assert two.data.metrics["test_psnr"] == pytest.approx(one.metrics["test_psnr"], abs=1e-3)

    checkpoint = tmp_path / "ckpt" / two.info.run_id / "last.pt"
    resumed = train_dehazer(dataclasses.replace(cfg, epochs=2, resume=str(checkpoint)))
    assert resumed.run_id == two.info.run_id and mlflow.get_run(resumed.run_id).info.status == "FINISHED"
    assert history(resumed.run_id, "world_size") == [2, 1]


def test_ctrl_c_under_torchrun_ends_the_run_killed_and_two_processes_resume_it(tmp_path, mlflow_store):
    cfg = tiny_config(tmp_path, epochs=500, experiment="test-kill")  # a plain CNN: BatchNorm under DDP
    command = [sys.executable, "-m", "training.cli", "train", "classify", *cli_arguments(cfg), "--nproc", "2"]
    # as from a terminal (see test_train_classify): the shortcut becomes torchrun, which forwards the signal
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + TIMEOUT_S
    while not list((tmp_path / "ckpt").glob("*/last.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "continue with --resume" in stderr, stderr
    (run,) = mlflow.search_runs(experiment_names=["test-kill"], output_format="list")
    assert run.info.status == "KILLED"
    checkpoint = next((tmp_path / "ckpt").glob("*/last.pt"))
    epoch = torch.load(checkpoint, weights_only=True)["epoch"]

    resumed = torchrun(tmp_path, "train", "classify",
                       *cli_arguments(dataclasses.replace(cfg, epochs=epoch + 1, resume=str(checkpoint))))
    assert resumed.returncode == 0, resumed.stderr
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == epoch + 1


FAILING_RANK = """
import os, sys
from training.cli import main
from training.data.augment import BatchAugment

def fail(self, images):
    raise RuntimeError("rank 1 fails in its first training step")

if os.environ["RANK"] == "1":
    BatchAugment.forward = fail
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_process_stops_the_others_with_its_error_shown(tmp_path, mlflow_store):
    (tmp_path / "failing_rank.py").write_text(FAILING_RANK)
    cfg = tiny_config(tmp_path, epochs=50, experiment="test-fail")
    proc = torchrun(tmp_path, "train", "classify", *cli_arguments(cfg), script=("failing_rank.py",))
    assert proc.returncode != 0
    assert "roadsight: error (rank 1): rank 1 fails in its first training step" in proc.stderr
    (run,) = mlflow.search_runs(experiment_names=["test-fail"], output_format="list")
    assert run.info.status == "FAILED", proc.stderr  # rank 0 was told, not left waiting
