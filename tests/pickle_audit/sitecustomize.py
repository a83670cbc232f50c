"""Auditing for the test server, loaded at start-up by each of its processes (tests/conftest.py puts
this folder on PYTHONPATH and sets ROADSIGHT_TEST_AUDIT_LOG).

Appends a JSON line for every class or function an unpickler looks up (the ``pickle.find_class``
audit event: torch.load, joblib and any pickle of objects raise it) and for every file opened
inside ROADSIGHT_MODELS_DIR, so the tests can show that serving unpickles nothing and reads only
the models' JSON and ONNX files.
"""
import json
import os
import sys


def _install(log_path: str, models_dir: str) -> None:
    def record(event: str, detail: str) -> None:
        with open(log_path, "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "event": event, "detail": detail}) + "\n")

    def hook(event, args):
        if event == "pickle.find_class":
            record(event, f"{args[0]}.{args[1]}")
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(models_dir + os.sep):
                record(event, path)

    sys.addaudithook(hook)


if os.environ.get("ROADSIGHT_TEST_AUDIT_LOG") and os.environ.get("ROADSIGHT_MODELS_DIR"):
    _install(os.environ["ROADSIGHT_TEST_AUDIT_LOG"], os.path.abspath(os.environ["ROADSIGHT_MODELS_DIR"]))
