"""Check the import layers (``[tool.importlinter]`` in pyproject.toml) on the package as it is installed.

The top-level folders ``server/``, ``trainer/``, ``adapters/``, ``launchd/`` and ``data/`` are installed as
``solverx.server`` … through setuptools' ``package-dir``. import-linter (grimp) finds a package by walking its
directory, and ``solverx/`` does not contain those folders, so run on the checkout it would not see them at all.
This stages the installed layout — each package's ``.py`` files copied to where ``package-dir`` puts them — and runs
``lint-imports`` on that copy.

    python tools/layers.py            # exit status of lint-imports
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_layout(dest: Path, root: Path = ROOT) -> Path:
    """Copy every package's modules to ``dest`` the way ``package-dir`` installs them; return ``dest``."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = project["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        source = root / package_dir.get(package, package.replace(".", "/"))
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copyfile(module, target / module.name)
    shutil.copyfile(root / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint_imports(staged: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on a staged layout (the staged copy comes first on the path, before the editable install)."""
    env = {**os.environ, "PYTHONPATH": str(staged)}
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    return subprocess.run(
        [*command, str(staged / "pyproject.toml"), "--no-cache"],
        cwd=staged, env=env, capture_output=True, text=True,
    )  # fmt: skip


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="solverx-layers-") as tmp:
        result = lint_imports(stage_layout(Path(tmp)))
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
