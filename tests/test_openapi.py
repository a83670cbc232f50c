"""The OpenAPI document (/docs.json) against what the shared test server really answers: the statuses
and bodies it documents, 405s with ``Allow``, and schemathesis (its coverage and fuzzing phases, every
check but positive_data_acceptance: a schema-valid "binary" need not be a decodable image) finding
nothing, within a bounded number of examples per operation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

APIS = ("/classify", "/classify_batch", "/dehaze")
ERROR_STATUSES = ("400", "405", "408", "413", "415", "500", "503", "504")


@pytest.fixture(scope="module")
def document(server) -> dict:
    response = httpx.get(server.url + "/docs.json", timeout=30)
    assert response.status_code == 200
    return response.json()


def test_every_api_documents_its_error_statuses_with_the_json_body(document):
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["additionalProperties"] is False
    for route in APIS:
        responses = document["paths"][route]["post"]["responses"]
        assert set(responses) == {"200", *ERROR_STATUSES}, route
        for status in ERROR_STATUSES:
            assert responses[status]["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        assert responses["405"]["headers"]["Allow"]["required"] and responses["503"]["headers"]["Retry-After"]["required"]
    assert set(document["paths"]["/dehaze"]["post"]["responses"]["200"]["content"]) == {"image/png", "image/jpeg"}
    assert "/info" in document["paths"] and "{\"error\": " in document["info"]["description"]


@pytest.mark.parametrize("method, path, allow", [("GET", "/classify", "POST"), ("PUT", "/dehaze", "POST"),
                                                 ("POST", "/readyz", "GET, HEAD"), ("DELETE", "/info", "GET, HEAD"),
                                                 ("PATCH", "/metrics", "GET, HEAD")])
def test_a_method_a_path_does_not_take_gets_405_with_allow(server, method, path, allow):
    response = httpx.request(method, server.url + path, timeout=30)
    assert response.status_code == 405 and response.headers["allow"] == allow
    assert response.json() == {"error": f"{path} takes {allow}, not {method}"}


def test_bad_values_get_the_documented_error_body_not_a_pydantic_list(server):
    image = {"image": ("a.png", b"not read: the quality is checked first", "image/png")}
    response = httpx.post(server.url + "/dehaze", files=image, data={"quality": "500"}, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": "field 'quality': Input should be less than or equal to 100"}
    missing = httpx.post(server.url + "/classify", files={"picture": ("a.png", b"x", "image/png")}, timeout=30)
    assert missing.status_code == 400 and set(missing.json()) == {"error"}


def test_schemathesis_finds_no_failure(server, tmp_path):
    """Fixed seed and examples, so a run is repeatable and takes about half a minute; the hooks keep out
    one known false positive of schemathesis (tests/schemathesis_hooks.py)."""
    st = Path(sys.executable).parent / "st"
    command = [str(st), "run", server.url + "/docs.json", "--phases", "coverage,fuzzing", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--max-examples", "60", "--seed", "1",
               "--workers", "1", "--request-timeout", "60", "--generation-database", "none", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
