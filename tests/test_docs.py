"""The documentation site builds, strictly, and says what the code does.

`mkdocs build --strict` runs as CI runs it (a real subprocess, the repository's mkdocs.yml): any warning (a
broken link or anchor, a page left out of the navigation, a docstring mkdocstrings cannot render) fails it.
Then the built site is read back: every page of the navigation was written, and the API reference holds every
name `import vaelab` gives. Two cheap consistency checks need no build: the README's relative links lead to
files that exist, and every `vaelab COMMAND` in a code block of the docs or the README names a real command and
only flags that command has.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import vaelab
from vaelab.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def nav_pages(nav) -> list[str]:
    """The Markdown files named in mkdocs.yml's nav, in order (sections flattened)."""
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out += nav_pages(value)
        elif isinstance(value, str) and value.endswith(".md"):
            out.append(value)
    return out


def built_page(site: Path, page: str) -> Path:
    """Where mkdocs writes a page (use_directory_urls: a.md -> a/index.html, b/index.md -> b/index.html)."""
    stem = page[:-len(".md")]
    if stem == "index" or stem.endswith("/index"):
        return site / f"{stem}.html"
    return site / stem / "index.html"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"mkdocs build --strict exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    assert seconds < 60, f"the docs build took {seconds:.0f} s"
    return out


def test_every_page_in_the_nav_is_built(config, site):
    pages = nav_pages(config["nav"])
    assert "index.md" in pages and "getting-started.md" in pages and "api/index.md" in pages
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"
    for page in pages:
        assert (DOCS / page).is_file(), f"{page} is in mkdocs.yml's nav but not in docs/"
        html = built_page(site, page)
        assert html.is_file(), f"{page} was not built ({html.relative_to(site)} missing)"
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk == set(pages), f"pages outside the nav: {sorted(on_disk - set(pages))}"


def test_the_api_reference_documents_the_public_names(site):
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'\bid="(vaelab\.[\w.]+)"', html))
    documented = {i.rsplit(".", 1)[1] for i in ids}
    missing = sorted(set(vaelab._LAZY) - documented)
    assert not missing, f"the API reference lacks {missing}"
    for anchor in ("vaelab.models.build_model", "vaelab.training.fit", "vaelab.config.TrainConfig",
                   "vaelab.config.ModelConfig", "vaelab.data.load_dataset", "vaelab.sklearn.AnomalyDetector"):
        assert anchor in ids, f"no anchor {anchor} in api/index.html"
    # the docstrings themselves were rendered, not only the headings
    assert "Build a registered model from a ModelConfig" in html
    assert "The test-split report" in html

    models = (site / "api" / "models" / "index.html").read_text(encoding="utf-8")
    for hook in ("Settings", "capabilities", "objective", "loss_weights", "encode", "decode", "epoch_metrics",
                 "auxiliaries"):
        assert f'id="vaelab.models.base.Autoencoder.{hook}"' in models, f"Autoencoder.{hook} is not documented"
    for name in ("ModelSettings", "Capabilities", "ModelOutput", "DiagonalGaussian", "PointMass"):
        assert f'id="vaelab.models.base.{name}"' in models


MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_links_lead_somewhere(site):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = [t for t in MD_LINK.findall(readme) if not re.match(r"[a-z]+:", t)]
    assert sum(t.startswith("docs/") for t in links) >= 10, "the README should link to the docs pages"
    for target in links:
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), f"README.md links to {target}, which does not exist"
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            html = built_page(site, path[len("docs/"):]).read_text(encoding="utf-8")
            assert f'id="{anchor}"' in html, f"README.md links to {target}: no such heading on that page"


def code_lines(text: str, indented: bool) -> list[str]:
    """Lines of the shell code blocks of a Markdown text: fenced ones (not ```python / ```toml ...), and with
    `indented`, those of blocks indented by four spaces after a blank line."""
    out, fence, in_indented, previous = [], None, False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "text")
        elif fence is not None:
            if fence in ("bash", "sh", "console", "shell", "text"):
                out.append(line)
        elif indented and line.startswith("    ") and (in_indented or not previous.strip()):
            in_indented = True
            out.append(line)
        elif line.strip():
            in_indented = False
        previous = line
    return out


COMMAND = re.compile(r"(?:^|[\s;&|(/])vaelab ([a-z][\w-]*)((?:[^#&|\\]|\\.)*)")


def commands_in(text: str, indented: bool) -> list[tuple[str, list[str]]]:
    """(command, flags) of every `vaelab COMMAND ...` in the shell code blocks of a Markdown text."""
    out = []
    for line in code_lines(text, indented):
        for name, rest in COMMAND.findall(line):
            out.append((name, re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)))
    return out


def test_every_documented_command_exists():
    names = {name for name, _, _ in COMMANDS}
    parser = build_parser(lazy=False)
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    sources = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md"))}
    found = {page: commands_in(text, indented=False) for page, text in sources.items()}
    found["README.md"] = commands_in((REPO / "README.md").read_text(encoding="utf-8"), indented=True)
    assert sum(map(len, found.values())) >= 50, "the command examples were not found"
    for page, commands in found.items():
        for name, flags in commands:
            assert name in names, f"{page}: `vaelab {name}` is not a command ({sorted(names)})"
            known = set(subparsers[name]._option_string_actions)
            unknown = [f for f in flags if f not in known]
            assert not unknown, f"{page}: `vaelab {name}` has no {unknown}"


def test_the_readme_python_example_runs(tmp_path):
    """The README's Python block, as written, in an empty folder and a fresh interpreter (offline: digits)."""
    blocks = [b for b in python_blocks(REPO / "README.md") if "vaelab.fit(" in b]
    assert len(blocks) == 1, f"README.md has {len(blocks)} python blocks that call vaelab.fit; this test runs one"
    (tmp_path / "example.py").write_text(blocks[0], encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, f"the example exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    report = proc.stdout.strip().splitlines()[-1]
    assert report.startswith("{'loss': ") and "'kl': " in report, report
    run = tmp_path / "runs" / "vae-digits"
    assert {"config.json", "metrics.jsonl", "model.safetensors"} <= {p.name for p in run.iterdir()}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 10  # epochs=10, one line each


def python_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```\s*$", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_shows_the_export_pages_onnxruntime_lines():
    """The README's onnxruntime example is the export page's, word for word (that page explains and tests it)."""
    readme = [b for b in python_blocks(REPO / "README.md") if "import onnxruntime" in b]
    page = [b for b in python_blocks(DOCS / "export.md") if "import onnxruntime" in b]
    assert len(readme) == 1 and len(page) == 1
    assert readme == page, "README.md's onnxruntime example differs from docs/export.md's; copy it over"
    lines = [line for line in readme[0].splitlines() if line.strip()]
    assert len(lines) <= 10 and "import torch" not in readme[0] and "vaelab" not in readme[0]
