"""Schemathesis fuzzes every documented route from /openapi.json: no request may produce a 5xx.

A tiny random-weight model with a short context keeps each generated request cheap whatever the fuzzer
picks for max_tokens or n. (Driven through each operation's hypothesis strategy: schemathesis' own pytest
plugin does not run under pytest 9.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dirs):
    from tests.server.harness import Server

    s = Server(str(tiny_model_dirs["qwen2"]), "--max-model-len", "96", "--max-num-seqs", "8")
    yield s
    s.stop()


def test_no_server_errors(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"} <= paths
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.200} -> {response.status_code}: "
                                f"{response.text[:200]}")

        check()
    assert not failures, "\n".join(failures[:10])
