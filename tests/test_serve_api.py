"""`vaelab serve` through real HTTP: the real server (the CLI in a subprocess, uvicorn on a free 127.0.0.1 port)
for tiny runs trained on digits, every endpoint with good and bad input, compared exactly with the model loaded
in this process."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.slow  # four trainings and five servers: ~1 minute on two cores

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # kind: `vaelab train` flags (1 epoch on digits)
    "vae": ["--model", "vae", "--latent-dim", "2"],
    "cvae": ["--model", "cvae", "--latent-dim", "2"],
    "vqvae": ["--model", "vqvae", "--codebook-size", "16"],
    "ae": ["--model", "ae", "--arch", "mlp", "--latent-dim", "3"],
}
TOKEN = "s3cret-token"


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, run: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "vaelab", "serve", str(run), "--port", str(self.port),
                                      *extra], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self, headers=None) -> Server:
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.communicate()}")
            try:
                if httpx.get(self.url + "/api/info", headers=headers, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not answer /api/info within 120 s")

    def get(self, path, **kw):
        return httpx.get(self.url + path, timeout=60, **kw)

    def post(self, path, body=None, **kw):
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vaelab.cli import main

    root, out = tmp_path_factory.mktemp("serve"), {}
    rows = np.random.default_rng(0).normal(size=(200, 5))
    np.savetxt(root / "rows.csv", rows, delimiter=",", header="a,b,c,d,e", comments="")
    out["tabular"] = root / "tabular"
    assert main(["train", "--model", "vae", "--latent-dim", "2", "--likelihood", "gaussian", "--dataset",
                 str(root / "rows.csv"), "--epochs", "1", "--out", str(out["tabular"]), "--no-pictures",
                 "--no-progress"]) == 0
    for kind, flags in RUNS.items():
        out[kind] = root / kind
        pictures = ["--no-pictures"] if kind != "vae" else []
        assert main(["train", *flags, "--epochs", "1", "--batch-size", "64", "--out", str(out[kind]),
                     *pictures, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def servers(runs):
    started = {kind: Server(run) for kind, run in runs.items()}  # the RUNS and "tabular"
    started["token"] = Server(runs["vae"], "--token", TOKEN)
    try:
        for kind, s in started.items():
            s.wait({"Authorization": f"Bearer {TOKEN}"} if kind == "token" else None)
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def models(runs):
    from vaelab import from_pretrained

    return {kind: from_pretrained(run).float().eval() for kind, run in runs.items()}


@pytest.fixture(scope="module")
def test_x():
    from vaelab.data import load_dataset

    test = load_dataset("digits", progress=False).test
    return test.batch(slice(0, 7)), test.y[:7], test


def f32(value) -> torch.Tensor:
    return torch.tensor(np.asarray(value, dtype=np.float32))


def png_of(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------------ metadata


def test_info_describes_each_model(servers, models):
    for kind in RUNS:
        info = servers[kind].get("/api/info").json()
        model = models[kind]
        caps = model.capabilities
        assert info["model"] == kind and info["run"] == kind
        assert info["input_shape"] == [1, 8, 8] and info["latent_shape"] == list(model.latent_shape)
        assert info["latent_dim"] == model.latent_size
        assert info["capabilities"] == {"stochastic": caps.stochastic, "conditional": caps.conditional,
                                        "discrete": caps.discrete, "semi": caps.semi_supervised,
                                        "samples": caps.samples}
        assert info["classes"] == [str(i) for i in range(10)] and info["num_classes"] == 10
        assert info["max_batch"] == 1024 and info["dataset"] == "digits" and info["epochs"] == 1
        assert info["image"] is True and info["test_size"] == 180
    vq = servers["vqvae"].get("/api/info").json()
    assert vq["code_grid"] == list(models["vqvae"].latent_shape[1:]) and vq["codebook_size"] == 16
    assert servers["vae"].get("/api/info").json()["code_grid"] is None


def test_metrics_and_pictures_are_the_run_directory_files(servers, runs):
    s = servers["vae"]
    rows = [json.loads(line) for line in (runs["vae"] / "metrics.jsonl").read_text().splitlines()]
    assert s.get("/api/metrics").json() == {"rows": rows}
    names = sorted(p.name for p in runs["vae"].glob("*.png"))
    assert names and s.get("/api/pictures").json() == {"pictures": names}
    r = s.get(f"/api/pictures/{names[0]}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (runs["vae"] / names[0]).read_bytes()
    for bad in ("nothing.png", "config.json", "..%2Fconfig.json", "%2Fetc%2Fpasswd"):
        r = s.get(f"/api/pictures/{bad}")
        assert r.status_code == 404 and "error" in r.json(), bad


def test_openapi_lists_every_route_and_the_docs_answer(servers):
    s = servers["vae"]
    paths = set(s.get("/openapi.json").json()["paths"])
    assert paths == {"/api/info", "/api/metrics", "/api/pictures", "/api/pictures/{name}", "/api/encode",
                     "/api/decode", "/api/decode-codes", "/api/reconstruct", "/api/sample", "/api/interpolate",
                     "/api/traverse", "/api/score", "/api/latent-map", "/api/kl", "/api/test-image/{index}",
                     "/api/scores"}
    assert s.get("/docs").status_code == 200
    page = s.get("/")
    assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8") or \
        (page.status_code == 404 and "explorer page" in page.json()["error"])
    r = s.get("/static/..%2F..%2Fserve%2Fapp.py")
    assert r.status_code == 404 and "error" in r.json()
    r = s.get("/no/such/route")
    assert r.status_code == 404 and "/docs" in r.json()["error"]


# ------------------------------------------------------------------------------------------ the model calls


def test_decode_is_model_decode_exactly(servers, models):
    z = [[0.5, -1.25], [0.0, 0.0], [2.0, 3.0]]
    for kind, label in (("vae", None), ("cvae", [3, 0, 9])):
        r = servers[kind].post("/api/decode", {"z": z, "label": label})
        assert r.status_code == 200
        cond = None if label is None else torch.tensor(label)
        with torch.no_grad():
            want = models[kind].decode(f32(z), cond)
        assert torch.equal(f32(r.json()["x"]), want)
    # one label for every row
    r = servers["cvae"].post("/api/decode", {"z": z, "label": 4})
    with torch.no_grad():
        assert torch.equal(f32(r.json()["x"]), models["cvae"].decode(f32(z), torch.tensor([4, 4, 4])))
    # as PNG images: the same pixels, rounded to 8 bits
    from PIL import Image

    r = servers["vae"].post("/api/decode", {"z": z, "format": "png"})
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in r.json()["png"]]
    with torch.no_grad():
        want = np.rint(models["vae"].decode(f32(z)).numpy()[:, 0] * 255).astype(np.uint8)
    assert np.array_equal(np.stack(images), want)


def test_encode_is_the_posterior_exactly(servers, models, test_x):
    x, y, _ = test_x
    for kind in RUNS:
        label = y.tolist() if kind == "cvae" else None
        r = servers[kind].post("/api/encode", {"x": x.tolist(), "label": label})
        assert r.status_code == 200, r.text
        body = r.json()
        with torch.no_grad():
            post = models[kind].encode(x, None if label is None else y)
        assert torch.equal(f32(body["mean"]), post.mean)
        assert ("logvar" in body) == models[kind].capabilities.stochastic
        if "logvar" in body:
            assert torch.equal(f32(body["logvar"]), post.logvar)
    vq = servers["vqvae"].post("/api/encode", {"x": x.tolist()}).json()
    assert torch.equal(torch.tensor(vq["indices"]), models["vqvae"].encode_indices(x))


def test_png_inputs_are_the_same_as_their_pixels(servers, models, test_x):
    x = test_x[0]
    pixels = np.rint(x.numpy()[:, 0] * 255).astype(np.uint8)
    quantized = torch.from_numpy(pixels[:, None].astype(np.float32) / 255)
    s = servers["vae"]
    by_png = s.post("/api/encode", {"png": [png_of(p) for p in pixels]}).json()
    by_x = s.post("/api/encode", {"x": quantized.tolist()}).json()
    assert by_png == by_x
    by_png = s.post("/api/score", {"png": [png_of(p) for p in pixels], "kind": "recon"}).json()
    assert by_png == s.post("/api/score", {"x": quantized.tolist(), "kind": "recon"}).json()
    r = s.post("/api/encode", {"png": [png_of(np.zeros((9, 8), np.uint8))]})
    assert r.status_code == 422 and "8x9 pixels" in r.json()["error"] and "8x8" in r.json()["error"]
    r = s.post("/api/encode", {"png": ["bm90IGEgcG5n"]})
    assert r.status_code == 422 and "not a base64-encoded PNG" in r.json()["error"]
    r = s.post("/api/encode", {"png": [png_of(pixels[0])], "x": x.tolist()})
    assert r.status_code == 422 and "one of" in r.json()["error"]


def test_reconstruct_and_the_vq_codes(servers, models, test_x):
    x, y, _ = test_x
    r = servers["cvae"].post("/api/reconstruct", {"x": x.tolist(), "label": y.tolist()})
    assert torch.equal(f32(r.json()["x"]), models["cvae"].reconstruct(x, y))
    vq = models["vqvae"]
    indices = vq.encode_indices(x)
    r = servers["vqvae"].post("/api/decode-codes", {"indices": indices.tolist()})
    assert torch.equal(f32(r.json()["x"]), vq.decode_indices(indices))
    assert torch.equal(f32(r.json()["x"]), vq.reconstruct(x))
    bad = indices.clone()
    bad[0, 0, 0] = 16
    r = servers["vqvae"].post("/api/decode-codes", {"indices": bad.tolist()})
    assert r.status_code == 422 and "[0, 16)" in r.json()["error"]
    r = servers["vqvae"].post("/api/decode-codes", {"indices": (indices.float() + 0.5).tolist()})
    assert r.status_code == 422 and "integers" in r.json()["error"]
    r = servers["vae"].post("/api/decode-codes", {"indices": indices.tolist()})
    assert r.status_code == 422 and "VQ-VAE" in r.json()["error"]


def test_sample_draws_the_prior_with_the_seed(servers, models):
    r = servers["vae"].post("/api/sample", {"n": 4, "seed": 7}).json()
    z = torch.randn((4, 2), generator=torch.Generator().manual_seed(7))
    assert torch.equal(f32(r["z"]), z)
    assert torch.equal(f32(r["x"]), models["vae"].sample(4, generator=torch.Generator().manual_seed(7)))
    r = servers["cvae"].post("/api/sample", {"n": 2, "seed": 1, "label": 5}).json()
    with torch.no_grad():
        want = models["cvae"].decode(torch.randn((2, 2), generator=torch.Generator().manual_seed(1)),
                                     torch.tensor([5, 5]))
    assert torch.equal(f32(r["x"]), want)
    for kind, body, words in (("ae", {"n": 2}, "no prior"), ("vqvae", {"n": 2}, "train-prior"),
                              ("cvae", {"n": 2}, "is conditional"), ("cvae", {"n": 2, "label": 10}, "[0, 10)"),
                              ("vae", {"n": 0}, "[1, 1024]"), ("vae", {"n": 1025}, "[1, 1024]"),
                              ("vae", {"n": 2.5}, "valid integer")):
        r = servers[kind].post("/api/sample", body)
        assert r.status_code == 422 and words in r.json()["error"], (kind, body, r.text)


def test_interpolate_and_traverse(servers, models, test_x):
    from vaelab.generation import lerp

    vae = models["vae"]
    r = servers["vae"].post("/api/interpolate", {"z0": [-2.0, 1.0], "z1": [2.0, -1.0], "steps": 5}).json()
    z = lerp(torch.tensor([[-2.0, 1.0]]), torch.tensor([[2.0, -1.0]]), torch.linspace(0, 1, 5))[0]
    assert torch.equal(f32(r["z"]), z) and len(r["x"]) == 5
    assert torch.equal(f32(r["x"]), vae.decode(z).detach())
    # between two test rows: the ends are their posterior means, each row encoded alone as the server does (a
    # batch of 2 may take other kernels, whose last bits differ)
    test = test_x[2]
    r = servers["vae"].post("/api/interpolate", {"index0": 3, "index1": 8, "steps": 3}).json()
    ends = torch.cat([vae.embed(test.batch(torch.tensor([i]))) for i in (3, 8)])
    assert torch.equal(f32(r["z"])[[0, 2]], ends)
    r = servers["cvae"].post("/api/interpolate", {"index0": 3, "index1": 8, "steps": 4})
    assert r.status_code == 200 and len(r.json()["x"]) == 4
    r = servers["vae"].post("/api/traverse", {"z": [0.25, -0.5], "dim": 1, "values": [-1.0, 0.0, 2.5]}).json()
    assert r["z"] == [[0.25, -1.0], [0.25, 0.0], [0.25, 2.5]]
    assert torch.equal(f32(r["x"]), vae.decode(f32(r["z"])).detach())
    for body, words in (({"z0": [0.0, 0.0], "z1": [1.0], "steps": 3}, "shape (1,); expected (2,)"),
                        ({"z0": [0.0, 0.0], "index0": 1, "z1": [1.0, 1.0]}, "not both"),
                        ({"index0": 0, "index1": 180}, "rows 0..179"),
                        ({"index0": 0, "index1": 1, "steps": 1}, "steps=1")):
        r = servers["vae"].post("/api/interpolate", body)
        assert r.status_code in (404, 422) and words in r.json()["error"], (body, r.text)
    r = servers["vae"].post("/api/traverse", {"z": [0.0, 0.0], "dim": 2})
    assert r.status_code == 422 and "[0, 1]" in r.json()["error"]
    r = servers["vqvae"].post("/api/traverse", {"index": 0, "dim": 0})
    assert r.status_code == 422 and "vector latent" in r.json()["error"]


def test_anomaly_scores_are_the_evaluation_scores(servers, models, test_x):
    from vaelab.data import ArrayDataset
    from vaelab.evaluation.scores import anomaly_scores

    x, _, test = test_x
    for kind in ("elbo", "recon", "iwae"):
        r = servers["vae"].post("/api/score", {"x": x.tolist(), "kind": kind}).json()
        want = anomaly_scores(models["vae"], ArrayDataset(x, scale=1.0), (kind,))[kind]
        assert r == {"score": want.tolist(), "kind": kind}
    r = servers["vae"].post("/api/score", {"x": x.tolist()}).json()
    assert r["kind"] == "elbo"
    # the scores fitted on normal data: fitted once on the run's training split, as a detector fits them
    from vaelab.data import load_dataset
    from vaelab.evaluation import scores as sc

    train = load_dataset("digits", progress=False).train
    codes = sc.latent_codes(models["vae"], train)
    mixture = sc.fit_latent_mixture(codes)
    fitted = {"latent_stats": sc.latent_statistics(codes), "mixture": mixture,
              "residual_var": sc.residual_variance(models["vae"], train),
              "combination": sc.combination_statistics(sc.anomaly_scores(models["vae"], train, ("recon", "gmm"),
                                                                         mixture=mixture))}
    for kind in ("latent", "gmm", "zrecon", "combined"):
        r = servers["vae"].post("/api/score", {"x": x.tolist(), "kind": kind}).json()
        want = anomaly_scores(models["vae"], ArrayDataset(x, scale=1.0), (kind,), **fitted)[kind]
        assert r["kind"] == kind and np.allclose(r["score"], want, rtol=1e-4, atol=1e-3), kind
    r = servers["ae"].post("/api/score", {"x": x.tolist()}).json()
    assert r["kind"] == "recon" and len(r["score"]) == 7
    r = servers["vae"].get("/api/scores", params={"kind": "recon"}).json()
    want = anomaly_scores(models["vae"], test, ("recon",))["recon"]
    assert np.allclose(r["score"], want, rtol=1e-5) and r["labels"] == test.y.tolist()
    for kind, body, words in (("vae", {"x": x.tolist(), "kind": "nope"}, "choose one of"),
                              ("ae", {"x": x.tolist(), "kind": "elbo"}, "'recon' or 'latent'"),
                              ("cvae", {"x": x.tolist()}, "unconditional")):
        r = servers[kind].post("/api/score", body)
        assert r.status_code == 422 and words in r.json()["error"], (kind, r.text)


# ------------------------------------------------------------------------------------------ the test split


def test_latent_map_round_trip(servers, models, test_x):
    from vaelab.generation import encode_dataset

    test = test_x[2]
    r = servers["vae"].get("/api/latent-map").json()
    codes = encode_dataset(models["vae"], test)
    proj = r["projection"]
    assert proj["kind"] == "identity" and r["indices"] == list(range(180)) and r["labels"] == test.y.tolist()
    points = np.asarray(r["points"], dtype=np.float32)
    latent = np.asarray(proj["mean"]) + points[:, :1] * np.asarray(proj["components"][0]) + \
        points[:, 1:] * np.asarray(proj["components"][1])
    assert np.array_equal(latent.astype(np.float32), codes)
    # 3 dimensions: PCA; the points are the codes' coordinates on the two components
    r = servers["ae"].get("/api/latent-map", params={"n": 50}).json()
    codes = encode_dataset(models["ae"], test)[:50].astype(np.float64)
    proj = r["projection"]
    mean, comps = np.asarray(proj["mean"]), np.asarray(proj["components"])
    assert proj["kind"] == "pca" and len(r["points"]) == 50 and comps.shape == (2, 3)
    assert np.allclose(comps @ comps.T, np.eye(2), atol=1e-12)
    assert np.allclose(r["points"], (codes - mean) @ comps.T, atol=1e-9)
    assert np.allclose(mean, codes.mean(0), atol=1e-12)
    r = servers["vae"].get("/api/latent-map", params={"n": 0})
    assert r.status_code == 422 and "error" in r.json()


def test_kl_per_dimension_and_the_test_images(servers, models, test_x):
    from vaelab.generation import traversal_order

    test = test_x[2]
    order, kl = traversal_order(models["vae"], test)
    r = servers["vae"].get("/api/kl").json()
    assert r["dims"] == order and np.allclose(r["kl"], [kl[d] for d in order], rtol=1e-6)
    assert r["kl"] == sorted(r["kl"], reverse=True)
    r = servers["ae"].get("/api/kl")
    assert r.status_code == 422 and "stochastic" in r.json()["error"]
    from PIL import Image

    r = servers["vae"].get("/api/test-image/5")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    want = np.rint(test.batch(torch.tensor([5]))[0, 0].numpy() * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)
    for bad, status in (("180", 404), ("-1", 404), ("x", 422)):
        r = servers["vae"].get(f"/api/test-image/{bad}")
        assert r.status_code == status and "error" in r.json(), bad


# ------------------------------------------------------------------------------------------ bad requests


BAD = [  # (path, raw body, status, words of the error)
    ("/api/decode", '{"z": [[0.0]]}', 422, "expected (B, 2)"),
    ("/api/decode", '{"z": [[NaN, 0.0]]}', 422, "non-finite"),
    ("/api/decode", '{"z": [[Infinity, 0.0]]}', 422, "non-finite"),
    ("/api/decode", '{"z": [[1e999, 0.0]]}', 422, "non-finite"),
    ("/api/decode", '{"z": [["a", 0.0]]}', 422, "numbers only"),
    ("/api/decode", '{"z": [[true, false]]}', 422, "numbers only"),
    ("/api/decode", '{"z": [[0.0, 1.0], [2.0]]}', 422, "ragged"),
    ("/api/decode", '{"z": [[0.0, 1.0]], "label": 3}', 422, "takes no label"),
    ("/api/decode", '{"z": 5}', 422, "valid list"),
    ("/api/decode", '{"z": []}', 422, "expected (B, 2)"),
    ("/api/decode", '{"zz": [[0, 0]]}', 422, "not a field"),
    ("/api/decode", '{"z": [[0, 0]], "format": "gif"}', 422, "format"),
    ("/api/decode", '{"z": [[0, 0]', 422, "not valid JSON"),
    ("/api/decode", '[1, 2]', 422, "valid dictionary"),
    ("/api/decode", '', 422, "missing"),
    ("/api/encode", '{"x": [[[0.5]]]}', 422, "expected (B, 1, 8, 8)"),
    ("/api/encode", '{}', 422, "one of"),
    ("/api/score", '{"x": [[[[0.5]]]], "kind": "elbo"}', 422, "expected (B, 1, 8, 8)"),
    ("/api/sample", '{"n": "3"}', 422, "valid integer"),
    ("/api/traverse", '{"z": [0, 0], "dim": -1}', 422, "dim=-1"),
    ("/api/interpolate", '{"index0": 0, "index1": 99999}', 404, "out of range"),
]


def test_bad_requests_get_4xx_json_and_the_server_lives_on(servers):
    s = servers["vae"]
    for path, raw, status, words in BAD * 3:  # a burst: each bad request three times
        r = httpx.post(s.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == status and words in r.json()["error"], (path, raw, r.status_code, r.text)
    r = httpx.post(s.url + "/api/decode", content=b"\xff\xfe garbage", timeout=60)
    assert r.status_code == 422
    big = np.zeros((1025, 2)).tolist()
    r = s.post("/api/decode", {"z": big})
    assert r.status_code == 422 and "at most 1024" in r.json()["error"]
    r = s.post("/api/decode", {"z": [[0.0, 0.0]]})
    assert r.status_code == 200 and len(r.json()["x"]) == 1
    assert s.proc.poll() is None


def test_an_oversized_body_is_413(servers):
    s = servers["vae"]
    limit = 1024 * 64 * 24 + (1 << 20)
    r = httpx.post(s.url + "/api/encode", content=b" " * (limit + 1), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit stops the stream
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    r = httpx.post(s.url + "/api/encode", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert s.post("/api/decode", {"z": [[0.0, 0.0]]}).status_code == 200


def test_labels_are_checked_against_the_model(servers):
    s = servers["cvae"]
    for body, words in (({"z": [[0.0, 0.0]]}, "is conditional"), ({"z": [[0.0, 0.0]], "label": 10}, "[0, 10)"),
                        ({"z": [[0.0, 0.0]], "label": -1}, "[0, 10)"),
                        ({"z": [[0.0, 0.0]] * 2, "label": [1, 2, 3]}, "3 labels for 2 rows"),
                        ({"z": [[0.0, 0.0]], "label": 1.5}, "label")):
        r = s.post("/api/decode", body)
        assert r.status_code == 422 and words in r.json()["error"], (body, r.text)


# ------------------------------------------------------------------------------------------ the token


def test_the_token_is_required_when_given(servers):
    s = servers["token"]
    for path in ("/api/info", "/", "/docs", "/openapi.json", "/static/explorer.js"):
        r = s.get(path)
        assert r.status_code == 401 and "token" in r.json()["error"], path
    assert s.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert s.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    r = s.post("/api/decode", {"z": [[0.0, 0.0]]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    r = s.get("/api/info", params={"token": TOKEN})
    assert r.status_code == 200 and "vaelab_token=" in r.headers["set-cookie"]
    assert s.get("/api/info", cookies={"vaelab_token": TOKEN}).status_code == 200
    assert s.get("/api/info", params={"token": TOKEN + "x"}).status_code == 401


def test_the_cli_refuses_an_open_address_without_a_token(runs):
    for host in ("0.0.0.0", "192.168.1.5"):
        p = subprocess.run([sys.executable, "-m", "vaelab", "serve", str(runs["vae"]), "--host", host,
                            "--port", str(free_port())], env=env(), capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert f"--host {host}" in p.stderr and "--token" in p.stderr
    p = subprocess.run([sys.executable, "-m", "vaelab", "serve", str(runs["vae"]) + "-missing"], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "does not exist" in p.stderr


def test_the_cli_prints_the_address_and_refuses_a_taken_port(servers, runs):
    line = servers["vae"].proc.stdout.readline()
    assert line.startswith(f"serving {runs['vae']} (vae) at {servers['vae'].url}/ ")
    assert f"{servers['token'].url}/?token={TOKEN}" in servers["token"].proc.stdout.readline()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "vaelab", "serve", str(runs["vae"]), "--port", str(port)],
                           env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"could not listen on 127.0.0.1:{port}" in p.stderr and "serving" not in p.stdout


def test_port_0_listens_on_a_free_port_and_prints_it(runs):
    import re

    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "serve", str(runs["ae"]), "--port", "0"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.match(rf"serving {re.escape(str(runs['ae']))} \(ae\) at http://127\.0\.0\.1:(\d+)/ ", line)
        assert found, line
        port = int(found.group(1))
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=30).json()["model"] == "ae"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_tabular_run_takes_rows(servers, models, runs):
    from vaelab.data import ArrayDataset, load_dataset
    from vaelab.evaluation.scores import anomaly_scores

    s, model = servers["tabular"], models["tabular"]
    info = s.get("/api/info").json()
    assert info["input_shape"] == [5] and info["image"] is False and info["classes"] is None
    test = load_dataset(runs["tabular"].parent / "rows.csv", progress=False).test
    x = test.batch(slice(0, 6))
    r = s.post("/api/score", {"x": x.tolist(), "kind": "elbo"}).json()
    assert r["score"] == anomaly_scores(model, ArrayDataset(x, scale=1.0), ("elbo",))["elbo"].tolist()
    r = s.post("/api/encode", {"x": x.tolist()}).json()
    assert torch.equal(f32(r["mean"]), model.embed(x))
    for path, body, words in (("/api/score", {"x": x[:, :4].tolist()}, "expected (B, 5)"),
                              ("/api/score", {"png": [png_of(np.zeros((8, 8), np.uint8))]}, "not images"),
                              ("/api/decode", {"z": [[0.0, 0.0]], "format": "png"}, "'array'")):
        r = s.post(path, body)
        assert r.status_code == 422 and words in r.json()["error"], (path, r.text)
    r = s.get("/api/test-image/0")
    assert r.status_code == 404 and "not images" in r.json()["error"]
    assert s.get("/api/latent-map").json()["labels"] is None
