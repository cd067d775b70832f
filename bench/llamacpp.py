"""llama.cpp's ``llama-server``, built once from source and cached, for the benchmarks that compare against it and
for an opt-in check of adapters exported to llama.cpp's GGUF LoRA format.

The source is the llama.cpp that PyPI's ``llama-cpp-python`` sdist vendors (``vendor/llama.cpp``), pinned by version
and sha256, so the build needs PyPI and nothing else: the web UI's prebuilt assets (fetched from Hugging Face by
default) and HTTPS support are switched off. ``-DGGML_NATIVE=OFF`` with the x86 features listed explicitly: a native
build on this project's machines segfaults (their CPUs report AMX, which ggml then uses). Only the ``llama-server``
target is built, ``nice -n 10`` on two jobs; the binary is static (``BUILD_SHARED_LIBS=OFF``) and cached as
``.state/bench/llama.cpp/<version>/llama-server`` beside ``build.json`` (flags, llama.cpp commit, build seconds).

Run ``.venv/bin/python bench/llamacpp.py`` to build (or find) it and print its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # newest on PyPI in December 2026; vendors llama.cpp 0c1e570
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = REPO / ".state" / "bench" / "llama.cpp"
JOBS = 2
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",  # native segfaults here: the CPU reports AMX
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_AVX512=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS model downloads (LLAMA_CURL is gone in this llama.cpp: ignored if given)
    "-DLLAMA_BUILD_UI=OFF",  # the web UI: no npm build ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of its assets from Hugging Face at build time
)


def _log(message: str) -> None:
    print(f"llama.cpp: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fetch_sdist(work: Path) -> Path:
    """The pinned sdist in ``work`` (downloaded with pip unless already there), its sha256 checked."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    sdist = work / name
    if not sdist.is_file():
        _log(f"downloading the llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist from PyPI")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
             "--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(work)],
            check=True,
        )  # fmt: skip
    if (digest := _sha256(sdist)) != SDIST_SHA256:
        sdist.unlink()
        raise SystemExit(f"{name}: sha256 {digest}, expected {SDIST_SHA256}")
    return sdist


def _extract(sdist: Path, work: Path) -> Path:
    """``vendor/llama.cpp`` of the sdist (and its git metadata, which names the commit) under ``work/src``."""
    src = work / "src"
    root = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return root / "vendor" / "llama.cpp"
    _log(f"extracting {sdist.name}")
    shutil.rmtree(src, ignore_errors=True)
    wanted = (f"{root.name}/vendor/llama.cpp", f"{root.name}/.git/modules/vendor/llama.cpp")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(src, members=members, filter="data")
    return root / "vendor" / "llama.cpp"


def _commit(source: Path) -> str:
    with contextlib.suppress(OSError):
        head = source.parent.parent / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
        return head.read_text().strip()
    return "unknown"


def _build(source: Path, work: Path) -> Path:
    build = work / "build"
    log_path = work / "build.log"
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(work))  # build-info's git must not find this repo
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    with open(log_path, "a") as log:

        def run(command: list[str], progress: bool = False) -> None:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                ["nice", "-n", "10", *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
            shown = 0.0
            for line in process.stdout:
                log.write(line)
                if progress and (step := re.match(r"\[(\d+)/(\d+)\]", line)) and time.monotonic() - shown > 30:
                    shown = time.monotonic()
                    _log(f"  build step {step[1]}/{step[2]}")
            if process.wait():
                log.flush()
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
                raise SystemExit(f"{tail}\nllama.cpp: `{' '.join(command)}` failed; the whole log is in {log_path}")

        _log(f"configuring ({source})")
        run(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_FLAGS])
        _log(f"building llama-server with {JOBS} jobs under nice -n 10 (about ten minutes on two cores)")
        run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(JOBS)], progress=True)
    return build / "bin" / "llama-server"


def ensure_llama_server() -> Path:
    """The cached ``llama-server`` binary of the pinned version, built on first use (progress on stderr)."""
    home = CACHE / LLAMA_CPP_PYTHON_VERSION
    binary = home / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if binary.is_file():
            return binary
        work = home / "work"  # kept until the binary exists, so an interrupted build resumes where it stopped
        work.mkdir(exist_ok=True)
        started = time.monotonic()
        source = _extract(_fetch_sdist(work), work)
        built = _build(source, work)
        seconds = time.monotonic() - started
        version = subprocess.run([str(built), "--version"], capture_output=True, text=True, timeout=60)
        record = {
            "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
            "sdist_sha256": SDIST_SHA256,
            "llama_cpp_commit": _commit(source),
            "version_output": (version.stdout + version.stderr).strip(),
            "cmake_flags": list(CMAKE_FLAGS),
            "jobs": JOBS,
            "build_seconds": round(seconds, 1),
        }
        (home / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        partial = home / "llama-server.partial"
        shutil.copy2(built, partial)
        partial.replace(binary)
        shutil.rmtree(work)
        _log(f"built {binary} in {seconds / 60:.1f} min")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(
    model: Path,
    *,
    lora: Sequence[Path] = (),
    threads: int = 2,
    parallel: int = 1,
    ctx_size: int = 4096,
    extra: Sequence[str] = (),
    timeout: float = 180,
) -> Iterator[str]:
    """``llama-server`` on ``model`` (a GGUF file) at a free loopback port; yields its base URL once ``/health``
    answers 200, stops it on exit. ``lora``: GGUF LoRA adapters, ids 0, 1, … in this order; a request picks its own
    with ``"lora": [{"id": 0, "scale": 1.0}]`` (the ones it omits at 0), and one without a ``"lora"`` field gets
    every adapter at scale 1 — even with ``--lora-init-without-apply``, which in this llama.cpp only skips applying
    them at start-up (``GET /lora-adapters`` still says 1), so a request for the base alone must send
    ``"lora": [{"id": 0, "scale": 0}]``. Requests with different LoRA lists are not batched together. ``ctx_size`` is
    shared by the ``parallel`` slots (each gets ctx_size / parallel). The server's log goes to a temporary file, shown
    when it fails to start or dies while in use."""
    import httpx

    port = _free_port()
    command = [str(ensure_llama_server()), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-np", str(parallel), "-c", str(ctx_size)]  # fmt: skip
    for path in lora:
        command += ["--lora", str(path)]
    if parallel > 1:
        command.append("--cont-batching")
    command += list(extra)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def tail() -> str:
            log.flush()
            log.seek(0)
            return "".join(log.readlines()[-30:])

        def fail(why: str) -> None:
            raise SystemExit(f"{tail()}\nllama-server {why}: {' '.join(command)}")

        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    fail(f"exited with {process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:  # 503 while loading
                        break
                if time.monotonic() > deadline:
                    fail(f"was not ready within {timeout:.0f} s")
                time.sleep(0.2)
            yield url
        finally:
            if process.poll() is not None:  # it died while in use: say how
                print(f"{tail()}\nllama-server exited with {process.returncode}", file=sys.stderr, flush=True)
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    binary = ensure_llama_server()
    print(binary)
    with contextlib.suppress(OSError):
        print((binary.parent / "build.json").read_text(), end="")


if __name__ == "__main__":
    main()
