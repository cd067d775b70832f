"""Shared fixtures: the tiny base model is built once per machine (cached by content key) and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("SOLVERX_TEST_CACHE", REPO_ROOT / ".state" / "test-cache"))
# The fast CPU kernels are built once into the test cache, not the user's cache (child processes inherit this).
os.environ.setdefault("SOLVERX_KERNEL_CACHE", str(TEST_CACHE / "kernels"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The default tiny base (``solverx-tiny``), built on first use and cached across runs."""
    from solverx.models.tiny import ensure_tiny

    return ensure_tiny(TEST_CACHE / "models")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real default base, SmolLM2-135M-Instruct, imported from its wheel once and cached across runs."""
    from solverx.models.builtin import BaseModelMissing, ensure_smollm

    try:
        return ensure_smollm(TEST_CACHE / "models")
    except BaseModelMissing as exc:  # ./run installs the wheel; a bare `pytest` elsewhere may not have it
        pytest.skip(str(exc))


# -- the HTTP server (tests/serving.py) and OpenAI's published schemas --------------------------------------

# OpenAI's spec: $SOLVERX_OPENAPI_SPEC, else the vendored subset (tests/serving.py: vendor_openapi_subset), else
# the full openapi.yaml where this project's machines keep it.
OPENAPI_SPECS = (
    *(Path(p) for p in [os.environ.get("SOLVERX_OPENAPI_SPEC")] if p),
    REPO_ROOT / "tests" / "data" / "openai-openapi-subset.json",
    Path("/work/shared/openai-openapi/openapi.yaml"),
)


@pytest.fixture(scope="session")
def solverx_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real ``solverx serve`` subprocess for the session, on the tiny base (a :class:`serving.Daemon`)."""
    from serving import serve_daemon

    with serve_daemon(tmp_path_factory.mktemp("solverx-home"), tiny_model_dir) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def real_daemon(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One ``solverx serve`` on the real base for the session's serving tests (structured outputs, tools)."""
    from serving import serve_daemon

    from solverx.models.builtin import SMOLLM_BASE_ID

    with serve_daemon(tmp_path_factory.mktemp("real-home"), smollm_dir, base_id=SMOLLM_BASE_ID) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def openapi():
    """``openapi(schema_name, body)`` validates a body against ``components/schemas/<schema_name>``."""
    from serving import OpenAPISchemas

    spec = next((path for path in OPENAPI_SPECS if path.exists()), None)
    if spec is None:
        pytest.skip(f"OpenAI's OpenAPI spec is at none of {', '.join(map(str, OPENAPI_SPECS))}")
    return OpenAPISchemas.load(spec)
