"""How `vaelab serve` holds up: concurrent clients against /api/decode and /api/score of a 28x28 MNIST model, and
the round trip of one decoded image on localhost.

    python benchmarks/serve.py --data-dir /work/shared/data           # trains a small MNIST VAE first (~1 epoch)
    python benchmarks/serve.py --run runs/vae-mnist --clients 32 --duration 30

The real server (`vaelab serve RUN` in a subprocess, uvicorn on a free 127.0.0.1 port) answers --clients
concurrent clients (asyncio, one keep-alive connection each) for --duration seconds; each client alternates a
decode of one latent point and the anomaly score of one test image (sent as a PNG). Reported: requests per
second, p50 / p99 latency per endpoint, the number of errors (any answer but 200: must be 0), and the server's
resident memory (VmRSS) after a warm-up (sequential, then --warmup seconds of the same concurrent load) and at
the end. Then one client decodes one image --round-trips times in a row: the p50 of that round trip (the goal:
under 20 ms). Prints a table and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from vaelab.io import atomic_write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def train(out: Path, data_dir: str | None, epochs: int) -> None:
    from vaelab.cli import main

    args = ["train", "--model", "vae", "--arch", "mlp", "--latent-dim", "2", "--dataset", "mnist", "--epochs",
            str(epochs), "--batch-size", "256", "--out", str(out), "--no-pictures", "--no-progress"]
    if data_dir:
        args += ["--data-dir", data_dir]
    if main(args) != 0:
        raise SystemExit("training the benchmark's model failed")


async def load(url: str, clients: int, duration: float, z, image) -> dict:
    lat = {"decode": [], "score": []}
    errors: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def client(i: int):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            k = i
            while time.perf_counter() < stop:
                name = "decode" if k % 2 == 0 else "score"
                body = {"z": z} if name == "decode" else {"png": image}
                t = time.perf_counter()
                try:
                    r = await c.post(f"/api/{name}", json=body)
                    ok = r.status_code == 200
                    why = str(r.status_code)
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                if ok:
                    lat[name].append(time.perf_counter() - t)
                else:
                    errors[why] = errors.get(why, 0) + 1
                k += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"lat": lat, "errors": errors, "wall": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="a 28x28 run directory [default: train a small MNIST VAE]")
    ap.add_argument("--data-dir", default=None, help="folder holding MNIST (vaelab's data directory)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the model trained when no --run [1]")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load [30]")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of concurrent load before the start RSS [5]")
    ap.add_argument("--round-trips", type=int, default=300, help="single-image decodes for the p50 [300]")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "vae-mnist"
        if not args.run:
            train(run, args.data_dir, args.epochs)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "vaelab", "serve", str(run), "--port", str(port)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 180
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {server.stderr.read()}")
                try:
                    info = httpx.get(url + "/api/info", timeout=5).json()
                    break
                except httpx.TransportError:
                    if time.time() > deadline:
                        raise SystemExit("the server did not start within 180 s")
                    time.sleep(0.3)
            if info["input_shape"] != [1, 28, 28]:
                raise SystemExit(f"--run takes {info['input_shape']}, not 28x28 images")
            z = np.zeros((1, *info["latent_shape"])).tolist()
            png = httpx.get(url + "/api/test-image/0")  # a real test image, sent back as PNG
            png.raise_for_status()
            image = [base64.b64encode(png.content).decode("ascii")]
            # warm-up: the first calls of each endpoint, then the baseline memory
            for _ in range(20):
                httpx.post(url + "/api/decode", json={"z": z}, timeout=60).raise_for_status()
                httpx.post(url + "/api/score", json={"png": image}, timeout=60).raise_for_status()
            rss_idle = rss_mb(server.pid)
            # then a short concurrent warm-up: the server's worker threads and their allocator arenas come into
            # being once, under load; growth after that would be a leak
            asyncio.run(load(url, args.clients, args.warmup, z, image))
            rss_start = rss_mb(server.pid)
            result = asyncio.run(load(url, args.clients, args.duration, z, image))
            rss_end = rss_mb(server.pid)
            # one client, one image at a time: the decode round trip
            trips = []
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(args.round_trips + 10):
                    t = time.perf_counter()
                    r = c.post("/api/decode", json={"z": z})
                    r.raise_for_status()
                    if i >= 10:
                        trips.append(time.perf_counter() - t)
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(10)

    lat, n_err = result["lat"], sum(result["errors"].values())
    total = sum(len(v) for v in lat.values())
    rows = {"decode": lat["decode"], "score": lat["score"], "all": lat["decode"] + lat["score"]}
    report = {
        "clients": args.clients, "duration_s": round(result["wall"], 2), "model": info["model"],
        "input_shape": info["input_shape"], "latent_shape": info["latent_shape"],
        "score_kind": info["default_score"],
        "requests": total, "requests_per_s": round(total / result["wall"], 1), "errors": n_err,
        "error_kinds": result["errors"],
        "latency_ms": {k: {"n": len(v), "p50": round(pct(v, 50), 2), "p99": round(pct(v, 99), 2)}
                       for k, v in rows.items()},
        "rss_mb": {"idle": round(rss_idle, 1), "start": round(rss_start, 1), "end": round(rss_end, 1)},
        "warmup_s": args.warmup,
        "decode_round_trip_ms": {"n": len(trips), "p50": round(pct(trips, 50), 2), "p99": round(pct(trips, 99), 2),
                                 "goal_p50": 20.0},
        "server_alive": alive,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"vaelab serve: {args.clients} clients for {result['wall']:.1f} s on {info['model']} "
          f"{info['input_shape']} (latent {info['latent_shape']}), score kind {info['default_score']}")
    print(f"  {'endpoint':<10}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for k, v in report["latency_ms"].items():
        print(f"  {k:<10}{v['n']:>10}{v['p50']:>10.2f}{v['p99']:>10.2f}")
    print(f"  requests/s {report['requests_per_s']}, errors {n_err}, server RSS {rss_idle:.1f} MB idle, "
          f"{rss_start:.1f} MB after the warm-up (start), {rss_end:.1f} MB at the end")
    print(f"  one-image decode round trip: p50 {report['decode_round_trip_ms']['p50']:.2f} ms, p99 "
          f"{report['decode_round_trip_ms']['p99']:.2f} ms over {len(trips)} requests (goal: p50 < 20 ms)")
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    if n_err or not alive:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
