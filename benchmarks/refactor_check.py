"""Does a change of the code move vaelab's numbers or speed? Two source trees, side by side in one sitting.

    python benchmarks/refactor_check.py --old-src /tmp/vaelab-v1/src              # identity + speed
    python benchmarks/refactor_check.py --old-src OLD/src --parts identity         # the quick part only
    python benchmarks/refactor_check.py --old-src OLD/src --epochs 10 --rounds 1   # the seed presets' 10 epochs
    python benchmarks/refactor_check.py --old-src OLD/src --parts speed --pin-cpu 0 --rounds 3  # one core, 1 thread

The old tree is any checkout's `src` folder (e.g. `git worktree add /tmp/vaelab-v1 <commit>`); the new one is this
repository's. Every run is a subprocess with PYTHONPATH set to its tree, so each imports only its own vaelab.

- identity: every model kind (ae, vae with a KL warm-up, cvae with capacity and free bits, hvae on the IWAE bound,
  m2 with 100 labels, vqvae) trains 2 epochs on the bundled digits with `vaelab.fit`, one thread, seed 0, under each
  tree; the per-epoch metrics (all but the wall time) must be equal to the last bit.
- speed: the tutorial presets seed-conv-ae and seed-vae train `--epochs` epochs on MNIST through `fit` (validating on
  the 10,000 test images after each epoch, writing a run directory as `vaelab train` does), old and new alternately,
  `--rounds` times, in fp32 and bf16. Reported: the median seconds per epoch of epochs 2.. (as benchmarks/speed.py),
  the new/old ratio per round, and the test loss after the last epoch (the last validation) of each tree.

- --pin-cpu N: every speed child runs on CPU N alone (taskset) with one thread. On a shared 2-core machine the other
  work (helpers, editors, the VM's neighbours on the same core) makes 2-thread epochs vary by 10-30% from one run to
  the next; with the children on their own core the spread shrinks. Keep the other processes off CPU N meanwhile
  (for example `taskset -p -c 1 PID` on each, repeated as processes start).

Results: benchmarks/results/refactor-check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IDENTITY_CHILD = r"""
import json, torch, vaelab
from vaelab.config import ModelConfig, TrainConfig, get_preset
from vaelab.data import load_dataset
torch.set_num_threads(1)
data = load_dataset("digits")
cases = {
    "ae": (ModelConfig(model="ae", arch="conv-pool", channels=(8, 4)), TrainConfig()),
    "vae (kl warm-up)": (get_preset("seed-vae").model, TrainConfig(kl_schedule="linear", kl_warmup=1)),
    "vae bf16": (get_preset("seed-vae").model, TrainConfig(precision="bf16")),
    "cvae (capacity, free bits)": (ModelConfig(model="cvae", arch="mlp", condition_dim=10, hidden=(32,), latent_dim=4),
                                   TrainConfig(capacity=5, capacity_epochs=1, free_bits=0.1)),
    "hvae (iwae K=5, warm-up)": (get_preset("mnist-hvae").model.replace(hidden=(64,), hidden2=(32,), latent_dim=8,
                                                                        latent2_dim=4),
                                 TrainConfig(iw_samples=5, kl_schedule="linear", kl_warmup=1)),
    "m2 (100 labels)": (get_preset("m2").model.replace(condition_dim=10, hidden=(64,)), TrainConfig(labels=100)),
    "vqvae": (ModelConfig(model="vqvae", channels=(8, 16), latent_dim=4, codebook_size=16), TrainConfig()),
}
out = {}
for name, (mc, tc) in cases.items():
    torch.manual_seed(0)
    model = vaelab.build_model(mc, input_shape=data.train.sample_shape)
    history = vaelab.fit(model, data.train, data.test, tc.replace(epochs=2, progress=False, threads=1))
    out[name] = [{k: v for k, v in row.items() if k != "time_s"} for row in history]
print(json.dumps(out))
"""

SPEED_CHILD = r"""
import json, sys, tempfile, torch, vaelab
from vaelab.config import get_preset
from vaelab.data import load_dataset
preset, precision, epochs, data_dir, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
data = load_dataset("mnist", data_dir, progress=False)
p = get_preset(preset)
torch.manual_seed(0)
model = vaelab.build_model(preset, input_shape=data.train.sample_shape)
with tempfile.TemporaryDirectory() as out:
    history = vaelab.fit(model, data.train, data.test, p.train.replace(epochs=epochs, progress=False,
                                                                       precision=precision,
                                                                       threads=int(threads)), out=out)
print(json.dumps({"times": [r["time_s"] for r in history], "test_loss": history[-1]["val_loss"]}))
"""


def child(src: str, code: str, *args: str, cpu: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    proc = subprocess.run([*pin, sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"child under {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def identity(old: str, new: str) -> dict:
    a, b = child(old, IDENTITY_CHILD), child(new, IDENTITY_CHILD)
    rows = {name: a[name] == b.get(name) for name in a}
    print("\nidentity: per-epoch metrics of 2 epochs on digits, old tree vs new")
    for name, same in rows.items():
        print(f"  {name:32s} {'identical' if same else 'DIFFERENT'}")
    return {"identical": rows, "old": a, "new": b}


def speed(old: str, new: str, presets: list[str], precisions: list[str], epochs: int, rounds: int,
          data_dir: str, cpu: int | None = None) -> list[dict]:
    rows = []
    for preset in presets:
        for precision in precisions:
            runs = {"old": [], "new": []}
            for _ in range(rounds):
                for tree, src in (("old", old), ("new", new)):  # alternately, so slow spells hit both
                    runs[tree].append(child(src, SPEED_CHILD, preset, precision, str(epochs), data_dir,
                                            "1" if cpu is not None else "0", cpu=cpu))
            med = {t: [statistics.median(r["times"][1:] or r["times"]) for r in runs[t]] for t in runs}
            row = {"preset": preset, "precision": precision, "epochs": epochs, "pinned_cpu": cpu,
                   "s_per_epoch": {t: statistics.median(v) for t, v in med.items()},
                   "s_per_epoch_rounds": med,
                   "new_over_old_time_rounds": [n / o for n, o in zip(med["new"], med["old"])],
                   "test_loss": {t: [r["test_loss"] for r in runs[t]] for t in runs}}
            rows.append(row)
            print(f"  {preset:13s} {precision:5s} old {row['s_per_epoch']['old']:6.2f} s/epoch, new "
                  f"{row['s_per_epoch']['new']:6.2f} (new/old per round: "
                  f"{', '.join(f'{r:.3f}' for r in row['new_over_old_time_rounds'])}); test loss old "
                  f"{row['test_loss']['old']}, new {row['test_loss']['new']}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-src", required=True, help="the `src` folder of the tree to compare against")
    p.add_argument("--new-src", default=str(REPO / "src"))
    p.add_argument("--parts", default="identity,speed")
    p.add_argument("--presets", default="seed-conv-ae,seed-vae")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pin-cpu", type=int, default=None, help="run the speed children on this CPU, one thread")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refactor-check.json"))
    args = p.parse_args()
    parts = args.parts.split(",")
    result = {"date": time.strftime("%Y-%m-%d"), "old_src": args.old_src, "new_src": args.new_src,
              "cpu_count": os.cpu_count()}
    if "identity" in parts:
        result["identity"] = identity(args.old_src, args.new_src)
    if "speed" in parts:
        print(f"\nspeed: {args.epochs} epochs on MNIST, {args.rounds} round(s), old and new alternately")
        result["speed"] = speed(args.old_src, args.new_src, args.presets.split(","), args.precisions.split(","),
                                args.epochs, args.rounds, args.data_dir, args.pin_cpu)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
