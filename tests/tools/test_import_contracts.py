"""The layer contracts of `.importlinter` hold on the tree, and each one fails when broken.

`make lint` and `make test` run `lint-imports` on the real tree; here each contract is shown to
catch the import it exists to forbid, on a copy of the packages with one violation added, so a
contract that has silently stopped checking anything (a renamed package, a typo in a module
list) fails this test instead of passing forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("server", "stts_vllm")


def _lint(root: Path) -> subprocess.CompletedProcess:
    # The copy's packages must shadow the editable install of the real ones.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(ROOT / ".importlinter", root)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return root


def test_the_contracts_hold_on_the_tree() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# (files to add, the contract's name as lint-imports prints it)
VIOLATIONS = {
    "stts_vllm imports server": (
        {"stts_vllm/_violation.py": "import server.settings\n"},
        "server may use stts_vllm, never the reverse",
    ),
    "core imports vllm": (
        {"stts_vllm/core/_violation.py": "import vllm\n"},
        "stts_vllm.core imports neither vLLM nor transformers",
    ),
    "core imports transformers": (
        {"stts_vllm/core/_violation.py": "def f():\n    import transformers\n"},
        "stts_vllm.core imports neither vLLM nor transformers",
    ),
    "core imports the model files": (
        {"stts_vllm/core/_violation.py": "from stts_vllm import families\n"},
        "stts_vllm.core imports neither vLLM nor transformers",
    ),
    "a package imports experiments": (
        {"experiments/__init__.py": "", "server/_violation.py": "import experiments\n"},
        "the packages import no experiments, benchmarks or tests",
    ),
    "library code imports the CLI": (
        {"stts_vllm/_violation.py": "from stts_vllm.cli import main\n"},
        "nothing imports the CLI modules",
    ),
    "a cycle between server modules": (
        {
            "server/_cycle_a.py": "import server._cycle_b\n",
            "server/_cycle_b.py": "def f():\n    import server._cycle_a\n",
        },
        "no import cycles between sibling modules",
    ),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_each_contract_fails_when_broken(case: str, tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    files, contract = VIOLATIONS[case]
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    result = _lint(root)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith(" BROKEN")]
    assert any(line.startswith(contract) for line in broken), result.stdout
