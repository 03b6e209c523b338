"""`vaelab export`: a run's encoder and decoder as ONNX files run by onnxruntime alone, and as torch.export
programs, matching PyTorch on the run's whole test split at batch sizes the export never saw.

Tiny runs are trained on digits (1 epoch) once per module: an AE, the seed-vae preset's conv VAE, an MLP VAE, a
CVAE (its condition is an input of both files) and a VQ-VAE (integer code indices out of the encoder, into the
decoder). The references are the model's own methods (encode, encode_indices, decode, decode_indices), not the
export's wrappers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vaelab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # fp32
BATCHES = (1, 7, 64)  # then the rest of the split: never the export's example batch (2)
RUNS = {  # kind: `vaelab train` flags
    "ae": ["--model", "ae", "--arch", "mlp", "--latent-dim", "8"],
    "vae-conv": ["--preset", "seed-vae"],
    "vae-mlp": ["--model", "vae", "--arch", "mlp", "--latent-dim", "4"],
    "cvae": ["--model", "cvae", "--latent-dim", "4"],
    "vqvae": ["--model", "vqvae", "--codebook-size", "16"],
}


def vaelab(*args) -> subprocess.CompletedProcess:
    """`python ARGS` (-m vaelab ..., or -c CODE ...) with the checkout's src/ first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kind -> run directory, each trained (1 epoch on digits) the first time a test asks for it."""
    from vaelab.cli import main

    root, runs = tmp_path_factory.mktemp("export"), {}

    def get(kind: str) -> Path:
        if kind not in runs:
            out = root / kind
            code = main(["train", *RUNS[kind], "--epochs", "1", "--batch-size", "64", "--out", str(out),
                         "--no-pictures", "--no-progress"])
            assert code == 0
            runs[kind] = out
        return runs[kind]

    return get


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """(kind, format) -> (folder, spec) of the run's export, made the first time a test asks for it."""
    from vaelab.export import export_run

    root, done = tmp_path_factory.mktemp("exported"), {}

    def get(kind: str, format: str) -> tuple[Path, dict]:
        if (kind, format) not in done:
            out = root / f"{kind}-{format}"
            done[kind, format] = out, export_run(trained(kind), out, format)
        return done[kind, format]

    return get


@pytest.fixture(scope="module")
def test_split():
    from vaelab.data import load_dataset

    return load_dataset("digits", progress=False).test  # the split every run above was evaluated on


def batches(n: int):
    start = 0
    for size in (*BATCHES, n):
        if start >= n:
            return
        yield slice(start, min(start + size, n))
        start += size


def reference(model, x, y):
    """What PyTorch gives, through the model's own interface: ({encoder output: array}, latent, decoded)."""
    cap = model.capabilities
    cond = y if cap.conditional else None
    with torch.no_grad():
        if cap.discrete:
            latent = model.encode_indices(x)
            return {"indices": latent.numpy()}, latent, model.decode_indices(latent).numpy()
        post = model.encode(x, cond)
        outs = {"mean": post.mean.numpy(), "logvar": post.logvar.numpy()} if cap.stochastic else \
            {"z": post.mean.numpy()}
        return outs, post.mean, model.decode(post.mean, cond).numpy()


def compare(run_files, model, data) -> dict:
    """Run the files (encode(feed) / decode(feed) -> {name: array}) over the whole split; the largest differences
    from PyTorch, by output (integer outputs: the number of differing entries)."""
    worst: dict[str, float] = {}
    encode, decode = run_files
    k = model.config.condition_dim
    for idx in batches(len(data)):
        x, y = data.batch(idx), data.y[idx]
        cond = {"condition": np.eye(k, dtype=np.float32)[y.numpy()]} if model.capabilities.conditional else {}
        ref, latent, decoded = reference(model, x, y)
        got = encode({"x": x.numpy(), **cond})
        assert sorted(got) == sorted(ref)
        name = "indices" if model.capabilities.discrete else "z"
        got["decoded"] = decode({name: latent.numpy(), **cond})["x"]
        ref["decoded"] = decoded
        for key, r in ref.items():
            assert got[key].shape == r.shape and got[key].dtype == r.dtype, key
            d = float((got[key] != r).sum()) if r.dtype.kind == "i" else float(np.abs(got[key] - r).max())
            worst[key] = max(worst.get(key, 0.0), d)
    return worst


def onnx_runner(out: Path):
    import onnxruntime as ort

    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    return (lambda feed: dict(zip([o.name for o in enc.get_outputs()], enc.run(None, feed))),
            lambda feed: dict(zip([o.name for o in dec.get_outputs()], dec.run(None, feed))))


def program_runner(out: Path, spec: dict):
    enc = torch.export.load(str(out / "encoder.pt2")).module()
    dec = torch.export.load(str(out / "decoder.pt2")).module()

    def run(module, part):
        names = [i["name"] for i in spec[part]["inputs"]]
        outs = [o["name"] for o in spec[part]["outputs"]]

        def call(feed):
            with torch.no_grad():
                got = module(*(torch.from_numpy(feed[n]) for n in names))
            return {n: t.numpy() for n, t in zip(outs, got if isinstance(got, tuple) else (got,))}

        return call

    return run(enc, "encoder"), run(dec, "decoder")


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNS))
def test_onnx_files_match_pytorch_on_the_whole_test_split(kind, trained, exported, test_split):
    import onnxruntime as ort

    from vaelab.models import from_pretrained

    out, spec = exported(kind, "onnx")
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "export.json"]
    assert json.loads((out / "export.json").read_text()) == spec
    for part in ("encoder", "decoder"):  # the files' names and shapes are export.json's, the batch axis symbolic
        session = ort.InferenceSession(str(out / f"{part}.onnx"), providers=["CPUExecutionProvider"])
        for got, want in ((session.get_inputs(), spec[part]["inputs"]), (session.get_outputs(), spec[part]["outputs"])):
            assert [(v.name, v.shape) for v in got] == [(w["name"], w["shape"]) for w in want]
            assert all(w["shape"][0] == "batch" for w in want)
    worst = compare(onnx_runner(out), from_pretrained(trained(kind)), test_split)
    for key, d in worst.items():
        assert d == 0 if key == "indices" else d <= TOLERANCE, (kind, key, d)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNS))
def test_exported_programs_match_pytorch_on_the_whole_test_split(kind, trained, exported, test_split):
    from vaelab.models import from_pretrained

    out, spec = exported(kind, "exported-program")
    assert sorted(p.name for p in out.iterdir()) == ["decoder.pt2", "encoder.pt2", "export.json"]
    assert spec["encoder"]["file"] == "encoder.pt2" and "opset" not in spec["versions"]
    worst = compare(program_runner(out, spec), from_pretrained(trained(kind)), test_split)
    for key, d in worst.items():
        assert d == 0 if key == "indices" else d <= TOLERANCE, (kind, key, d)


# ------------------------------------------------------------------------------------------- export.json


@pytest.mark.slow
def test_export_json_says_what_goes_in_and_comes_out(exported):
    """The CVAE: the condition is an input of both files; the VQ-VAE: integer indices out and in."""
    out, spec = exported("cvae", "onnx")
    cond = {"name": "condition", "dtype": "float32", "shape": ["batch", 10]}
    enc, dec = spec["encoder"], spec["decoder"]
    assert [(i["name"], i["dtype"], i["shape"]) for i in enc["inputs"]] == [("x", "float32", ["batch", 1, 8, 8]),
                                                                           tuple(cond.values())]
    assert [(o["name"], o["shape"]) for o in enc["outputs"]] == [("mean", ["batch", 4]), ("logvar", ["batch", 4])]
    assert [(i["name"], i["shape"]) for i in dec["inputs"]] == [("z", ["batch", 4]), ("condition", ["batch", 10])]
    assert [(o["name"], o["dtype"], o["shape"]) for o in dec["outputs"]] == [("x", "float32", ["batch", 1, 8, 8])]
    assert enc["inputs"][1]["classes"] == [str(i) for i in range(10)]
    assert "one-hot" in enc["inputs"][1]["meaning"] and "N(0, I)" in enc["outputs"][0]["meaning"]
    assert spec["model"]["name"] == "cvae" and spec["model"]["capabilities"]["conditional"] is True
    pre = spec["preprocessing"]
    assert (pre["layout"], pre["channels"], pre["height"], pre["width"], pre["value_range"], pre["dataset"]) == \
        ("NCHW", 1, 8, 8, [0.0, 1.0], "digits")
    import onnx
    import onnxscript

    assert spec["versions"] == {"vaelab": __import__("vaelab").__version__, "torch": torch.__version__,
                                "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                                "opset": onnx.load(str(out / "encoder.onnx")).opset_import[0].version}

    _, spec = exported("vqvae", "onnx")
    assert [(o["name"], o["dtype"], o["shape"]) for o in spec["encoder"]["outputs"]] == \
        [("indices", "int64", ["batch", 2, 2])]
    assert [(i["name"], i["dtype"]) for i in spec["decoder"]["inputs"]] == [("indices", "int64")]
    assert spec["model"]["settings"]["codebook_size"] == 16


@pytest.mark.slow
def test_the_command_checks_the_files_on_the_test_split(trained, tmp_path):
    out = tmp_path / "files"
    proc = vaelab("-m", "vaelab", "export", trained("vae-mlp"), "--out", out, "--batch-size", 50)
    assert proc.returncode == 0, proc.stderr
    assert "encoder.onnx  x (batch, 1, 8, 8) float32 -> mean (batch, 4) float32, logvar (batch, 4) float32" \
        in proc.stdout
    assert "checked on the test split (180 samples, batches of 50)" in proc.stdout
    spec = json.loads((out / "export.json").read_text())
    check = spec["parity"]
    assert (check["samples"], check["batch_size"]) == (180, 50)
    assert sorted(check["encoder"]) == ["logvar", "mean"] and sorted(check["decoder"]) == ["x"]
    assert all(0 <= d <= TOLERANCE for part in ("encoder", "decoder") for d in check[part].values())
    assert spec["preprocessing"]["pixel_scale"] == 16.0  # digits' pixels are 0..16
    assert (spec["model"]["name"], spec["model"]["preset"], spec["model"]["run"]) == ("vae", None,
                                                                                str(trained("vae-mlp")))


# ------------------------------------------------------------------------------------------- bad input


def test_a_missing_run_directory_is_a_clean_error(tmp_path):
    proc = vaelab("-m", "vaelab", "export", tmp_path / "nope", "--out", tmp_path / "out")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"vaelab: error: run directory {str(tmp_path / 'nope')!r} does not exist; give the --out "
                           "directory of a `vaelab train` run\n")
    assert not (tmp_path / "out").exists()


def test_an_unknown_format_is_refused(tmp_path):
    proc = vaelab("-m", "vaelab", "export", tmp_path, "--format", "tflite")
    assert proc.returncode == 2
    assert "argument --format: invalid choice: 'tflite' (choose from 'onnx', 'exported-program')" in proc.stderr
    from vaelab.export import export_model
    from vaelab.models import build_model

    with pytest.raises(ConfigError, match=r"unknown export format 'tflite'; expected one of onnx, exported-program"):
        export_model(build_model("ae", input_shape=(1, 8, 8)), tmp_path / "out", "tflite")
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_or_a_folder_of_other_files_is_refused(trained, tmp_path):
    run = trained("ae")
    file = tmp_path / "taken"
    file.write_text("mine")
    proc = vaelab("-m", "vaelab", "export", run, "--out", file)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == (f"vaelab: error: invalid export: output {str(file)!r} is a file, not a folder; give --out "
                           "a folder (new or holding an earlier export) to write the files into\n")
    assert file.read_text() == "mine"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep")
    from vaelab.export import export_run

    with pytest.raises(ConfigError, match="holds files that are not an export"):
        export_run(run, folder, "exported-program")
    assert [p.name for p in folder.iterdir()] == ["todo.txt"]


def test_without_the_onnx_package_the_command_says_which_extra_to_install(trained, tmp_path):
    blocked = "import sys; sys.modules['onnx'] = None; from vaelab.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = vaelab("-c", blocked, "export", trained("ae"), "--out", tmp_path / "out")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == ('vaelab: error: invalid export: --format onnx needs the packages onnx and onnxscript '
                           '(missing here: onnx, onnxscript); install the export extra: pip install "vaelab[export]" '
                           '(or use --format exported-program, which needs torch only)\n')
    assert not (tmp_path / "out").exists()


class Branchy(nn.Module):
    """An encoder whose Python branches on a tensor's value: no traced program can hold that."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 8)

    def forward(self, x):
        h = self.lin(x.flatten(1))
        return h if h.sum() > 0 else -h


def test_a_model_that_cannot_be_traced_is_refused_and_nothing_is_left_behind(tmp_path):
    from vaelab.export import export_model
    from vaelab.models import build_model

    model = build_model("vae", encoder=Branchy(), decoder=nn.Sequential(nn.Linear(4, 64), nn.Unflatten(1, (1, 8, 8))),
                        latent_dim=4, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError) as e:
        export_model(model, tmp_path / "out", "exported-program")
    text = str(e.value)
    assert text.startswith("invalid export (4 problems):\n  - model 'vae' cannot be exported: its encoder does not "
                           "trace as a program of a dynamic batch size\n  - non-strict torch.export: ")
    assert "supported: models whose encode and decode are tensor functions of the input" in text
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary one beside it


@pytest.mark.slow
def test_an_earlier_export_is_replaced_whole(trained, tmp_path):
    from vaelab.export import export_run

    out = tmp_path / "out"
    export_run(trained("ae"), out, "exported-program")
    spec = export_run(trained("vae-mlp"), out, "exported-program")
    assert spec["model"]["name"] == "vae" and [o["name"] for o in spec["encoder"]["outputs"]] == ["mean", "logvar"]
    assert sorted(p.name for p in out.iterdir()) == ["decoder.pt2", "encoder.pt2", "export.json"]
    assert json.loads((out / "export.json").read_text()) == spec
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.slow
def test_the_pages_lines_encode_and_decode_with_onnxruntime_alone(trained, exported, test_split, tmp_path):
    """docs/export.md's snippet, run as written (digits' pixels are 0..16, not 0..255) in a process where torch
    and vaelab cannot be imported, gives PyTorch's reconstructions."""
    import re

    from vaelab.models import from_pretrained

    page = (REPO / "docs" / "export.md").read_text()
    snippet = re.search(r"## Encode and decode with onnxruntime alone.*?```python\n(.*?)```", page, re.DOTALL).group(1)
    out, spec = exported("vae-conv", "onnx")
    assert spec["preprocessing"]["pixel_scale"] is None  # export_run without data: the run's data was not read
    pixels = (test_split.x[:, 0].numpy()).astype(np.uint8)  # (N, 8, 8) in 0..16
    np.save(tmp_path / "images.npy", pixels)
    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['vaelab'] = None\nimport numpy as np\n"
            f"images = np.load({str(tmp_path / 'images.npy')!r})\n"
            + snippet.replace("export-onnx/", f"{out}/").replace("255.0", "16.0")
            + f"np.save({str(tmp_path / 'recon.npy')!r}, recon)\nnp.save({str(tmp_path / 'new.npy')!r}, new)\n")
    proc = vaelab("-c", code)
    assert proc.returncode == 0, proc.stderr
    model = from_pretrained(trained("vae-conv"))
    with torch.no_grad():
        want = model.reconstruct(test_split.to_float()).numpy()
    recon = np.load(tmp_path / "recon.npy")
    assert recon.shape == want.shape == (180, 1, 8, 8)
    assert float(np.abs(recon - want).max()) <= TOLERANCE
    new = np.load(tmp_path / "new.npy")
    assert new.shape == (16, 1, 8, 8) and 0 <= new.min() and new.max() <= 1
