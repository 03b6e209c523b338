"""vaelab's import layers and the absence of import cycles, checked by import-linter against the contracts in
pyproject.toml ([tool.importlinter]). Imports inside functions count as much as those at the top of a module."""

import ast
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


def _body_lines(node) -> int:
    """Lines of a function's body, its docstring left out."""
    first = node.body[0]
    docstring = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                 and isinstance(first.value.value, str))
    start = first.end_lineno + 1 if docstring and len(node.body) > 1 else first.lineno
    return node.end_lineno - start + 1


def test_no_function_is_longer_than_a_screen():
    """Small rooms: a function body (docstring aside) of more than 60 lines needs a comment that says why, on
    the line above its `def`, starting with '# long:'."""
    too_long = []
    for path in sorted((REPO / "src" / "vaelab").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > 60:
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                if not above.startswith("# long:"):
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({_body_lines(node)} lines)")
    assert not too_long, "functions over 60 lines without a '# long:' reason:\n" + "\n".join(too_long)
