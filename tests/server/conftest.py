"""Fixtures of the server tests: one tiny model directory per session."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from tests.server.harness import make_model_dir
    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))
