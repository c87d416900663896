"""The small form of `python -m serve.reliability`: a real service on 127.0.0.1 (2 replicas behind serve.guard,
auth on) attacked with bad input, decompression-bomb headers, over-cap bodies, slow clients and a burst.

Asserts what the answers are (status codes, JSON bodies, Retry-After), never how fast they came. About a minute
on 2 cores.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

pytest.importorskip("ray.serve")
pytest.importorskip("aiohttp")

EXPECTED = {  # case -> (status, error code)
    "no token": (401, "unauthorized"),
    "wrong token": (401, "unauthorized"),
    "route list without token": (401, "unauthorized"),
    "docs without token": (401, "unauthorized"),
    "not an image": (415, "not_an_image"),
    "truncated png": (422, "invalid_image"),
    "json nested 100k deep": (400, "malformed_json"),
    "png 1048576 x 1 (1 kB)": (413, "image_too_large"),
    "png 8000 x 8000 header": (413, "image_too_large"),
    "png 4000 x 10": (413, "image_too_large"),
    "largest accepted image 4096 x 4096": (200, None),
    "declared body over the cap": (413, "request_too_large"),
    "chunked body over the cap": (413, "request_too_large"),
}


def test_quick_reliability_suite(tmp_path):
    import ray

    from serve.reliability import ReliabilityConfig, main

    if ray.is_initialized():  # the suite starts its own local Ray
        ray.shutdown()
    md = main(ReliabilityConfig(out=str(tmp_path), quick=True))
    result = json.loads((tmp_path / "reliability.json").read_text())
    assert md.read_text().startswith("# Reliability suite")

    got = {b["case"]: (b["status"], b["error"]) for b in result["bad_inputs"]}
    assert got == EXPECTED
    assert all(b["json"] for b in result["bad_inputs"])
    assert result["summary"]["plain_text_5xx"] == 0 and result["summary"]["any_5xx"] == 0

    # Slow clients are cut off with 408 (their bodies never reach a replica); good requests all succeed meanwhile.
    slow = result["slow_clients"]
    assert slow["slow_client_answers"] == {"408": slow["slow_clients"]}
    assert slow["good"]["requests"] > 0 and slow["good"]["failed"] == 0
    assert slow["healthz"]["samples"] > 0 and slow["healthz"]["failures"] == 0

    # A burst is either served or shed with a JSON 503 carrying Retry-After; the service then serves again.
    over = result["overload"]
    assert set(over["statuses"]) <= {"200", "503"} and over["other_5xx"] == 0
    assert over["shed_503"] == over["shed_with_retry_after"] == over["shed_json"]
    assert over["recovery_s"] is not None
