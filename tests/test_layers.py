"""vaelab's import layers and the absence of import cycles, checked by import-linter against the contracts in
pyproject.toml ([tool.importlinter]). Imports inside functions count as much as those at the top of a module."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    script = Path(sys.executable).parent / "lint-imports"  # the venv's, next to this interpreter
    found = str(script) if script.is_file() else shutil.which("lint-imports")
    assert found, ("lint-imports not found: import-linter is in the test extra; install it with "
                   "pip install -c constraints.txt -e '.[test]'")
    return found


def test_the_import_contracts_are_kept():
    path = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    out = subprocess.run([_lint_imports(), "--no-cache", "--no-logo"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"lint-imports exited with {out.returncode}:\n{out.stdout}\n{out.stderr}"
