"""The "Write your own model" page's example (docs/write-your-own-model.md) runs as written.

Its ```python blocks, in order, are one script: the test writes them to a file in an empty folder and runs it
in a fresh interpreter there, as a reader would. The script defines a model (WAE-MMD), registers it, trains it on
the bundled digits for two epochs, evaluates, samples and reloads it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "write-your-own-model.md"
TITLE = "# Write your own model"


def section() -> str:
    """The page's text under its title TITLE, up to its next second-level heading (it has one title)."""
    text = PAGE.read_text(encoding="utf-8")
    assert text.count(TITLE + "\n") == 1, f"{PAGE.name} has no single {TITLE!r} title"
    body = text.split(TITLE + "\n", 1)[1]
    return re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```\s*$", text, flags=re.DOTALL | re.MULTILINE)


def test_the_section_explains_the_interface():
    text = section()
    for word in ("Settings", "ModelSettings", "capabilities", "Capabilities", "objective", "loss_weights",
                 "@register", '[project.entry-points."vaelab.models"]', "vaelab models"):
        assert word in text, f"the section does not mention {word}"
    blocks = python_blocks(text)
    assert len(blocks) >= 2 and any("@register(" in b for b in blocks)
    lines = sum(len([line for line in b.splitlines() if line.strip()]) for b in blocks)
    assert lines <= 60, f"the example has {lines} lines of code; keep it short"


def test_the_example_runs_in_an_empty_folder(tmp_path):
    script = tmp_path / "example.py"
    script.write_text("\n\n".join(python_blocks(section())), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, script.name], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"the example exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "'mmd'" in proc.stdout  # the printed evaluation reports the model's own loss term

    run = tmp_path / "runs" / "wae"
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "checkpoint.safetensors"):
        assert (run / name).is_file(), f"{name} not in {sorted(p.name for p in run.iterdir())}"
    model = json.loads((run / "config.json").read_text())["model"]
    assert model["model"] == "wae" and model["settings"] == {"mmd_weight": 5.0}
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("train_mmd" in e for e in epochs)
    with Image.open(tmp_path / "wae-samples.png") as im:
        assert im.format == "PNG" and min(im.size) >= 50
