"""The import layers hold, on the package as installed, and a cycle added on purpose breaks them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from layers import lint_imports, stage_layout  # noqa: E402


@pytest.fixture()
def staged(tmp_path: Path) -> Path:
    return stage_layout(tmp_path / "layout")


def test_the_layout_is_the_installed_one_with_the_top_level_folders_inside_solverx(staged: Path) -> None:
    for module in ("server/app.py", "trainer/run.py", "adapters/registry.py", "launchd/control.py", "data/__init__.py"):
        assert (staged / "solverx" / module).is_file(), module
    assert (staged / "solverx" / "engine" / "core.py").is_file()


def test_the_layers_hold(staged: Path) -> None:
    result = lint_imports(staged)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
    analyzed = int(result.stdout.split("Analyzed ")[1].split(" files")[0])
    assert analyzed >= sum(1 for _ in staged.rglob("*.py"))  # it saw the mapped folders, not only solverx/


@pytest.mark.parametrize(
    ("module", "line", "named"),
    [
        ("trainer/run.py", "from solverx.server import app", "solverx.trainer.run -> solverx.server.app"),
        ("engine/core.py", "from solverx.adapters import registry", "solverx.engine.core -> solverx.adapters.registry"),
        ("server/app.py", "import solverx.trainer.schedule", "solverx.server.app -> solverx.trainer.schedule"),
    ],
)
def test_an_import_against_the_layers_fails_the_check(staged: Path, module: str, line: str, named: str) -> None:
    path = staged / "solverx" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # added by the test\n", encoding="utf-8")
    result = lint_imports(staged)
    assert result.returncode != 0 and "BROKEN" in result.stdout
    assert named in result.stdout
