"""The package as users get it: `python -m build` makes a wheel and an sdist, and the wheel, installed into a
fresh virtual environment, runs the README's first command there.

The build and the install are real (pip resolves vaelab's dependencies through the same package index and
constraints.txt as CI; nothing of this checkout is on the fresh environment's path), so the test catches a module
left out of the wheel, a dependency missing from pyproject.toml, data files that do not ship (py.typed) and a
version that disagrees with itself.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import vaelab

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=900, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel built from a copy of the tracked files (so the checkout gets no build/ or
    egg-info of the test's making); the wheel is built from the sdist, as `python -m build` does."""
    root = tmp_path_factory.mktemp("build")
    src = root / "src-copy"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    out = root / "dist"
    # --no-isolation: build with this environment's setuptools (pyproject's build-system requires it)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=root)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


def test_the_version_lives_in_one_place():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(r'^version\s*=\s*"', pyproject, flags=re.MULTILINE), "pyproject.toml repeats the version"
    assert 'version = { attr = "vaelab.__version__" }' in pyproject
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {vaelab.__version__} " in changelog, f"CHANGELOG.md has no section for {vaelab.__version__}"


def test_the_wheel_holds_the_package_and_its_metadata(dist):
    wheel, _ = dist
    assert wheel.name == f"vaelab-{vaelab.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(f"vaelab-{vaelab.__version__}.dist-info/METADATA"))
        entry_points = z.read(f"vaelab-{vaelab.__version__}.dist-info/entry_points.txt").decode()
    tracked = subprocess.run(["git", "ls-files", "src/vaelab"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    modules = {name.removeprefix("src/") for name in tracked if name.endswith(".py")}
    assert modules and modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    assert "vaelab/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert meta["Name"] == "vaelab" and meta["Version"] == vaelab.__version__
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requires)
    for extra in ("export", "tensorboard", "mlflow", "tune", "docs"):
        assert extra in meta.get_all("Provides-Extra")
    # the optional features stay out of the core requirements
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.split(">")[0].split("=")[0].strip() in ("onnx", "mlflow", "optuna", "mkdocs") for r in core)
    assert "vaelab = vaelab.cli:main" in entry_points


def test_the_sdist_holds_what_builds_and_tests_the_package(dist):
    _, sdist = dist
    top = f"vaelab-{vaelab.__version__}"
    with tarfile.open(sdist) as t:
        names = set(t.getnames())
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "constraints.txt",
                 "src/vaelab/__init__.py", "src/vaelab/py.typed", "tests/conftest.py",
                 "tests/fixtures/v1/expected.json"):
        assert f"{top}/{name}" in names, f"{name} is not in the sdist"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


@pytest.mark.long
def test_the_wheel_installs_into_a_fresh_environment_and_runs_the_first_command(dist, tmp_path):
    wheel, _ = dist
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    bin_ = venv / ("Scripts" if os.name == "nt" else "bin")
    _run([bin_ / "python", "-m", "pip", "install", "-q", "--no-compile", "-c", REPO / "constraints.txt", wheel], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="2", MPLBACKEND="Agg")
    version = _run([bin_ / "vaelab", "--version"], cwd=tmp_path, env=env).stdout.strip()
    assert version == f"vaelab {vaelab.__version__}"
    where = _run([bin_ / "python", "-c", "import vaelab, importlib.util as u; print(vaelab.__file__); "
                  "print([m for m in ('onnx', 'mlflow', 'optuna', 'mkdocs') if u.find_spec(m)])"],
                 cwd=tmp_path, env=env).stdout.splitlines()
    assert Path(where[0]).is_relative_to(venv), f"vaelab came from {where[0]}, not the fresh environment"
    assert where[1] == "[]", f"the core install pulled optional packages: {where[1]}"

    # the README's first command, in an empty folder
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first = re.search(r"^    python3 -m venv \.venv && .* && \.venv/bin/(vaelab .*)$", readme, flags=re.MULTILINE)
    assert first, "README.md has no quick-start command ending in .venv/bin/vaelab ..."
    work = tmp_path / "work"
    work.mkdir()
    proc = _run([bin_ / "vaelab", *first.group(1).split()[1:]], cwd=work, env=env)
    runs = [p for p in (work / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, proc.stdout[-2000:]
    written = {p.name for p in runs[0].iterdir()}
    assert {"config.json", "metrics.jsonl", "model.safetensors"} <= written, written
    assert any(name.endswith(".png") for name in written), written
