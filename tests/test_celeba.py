"""CelebA for real: a miniature in the authors' formats (a zip of 178x218 JPEGs under img_align_celeba/, the
partition file, the attribute file with its count line, its 40 names and irregular spacing), written here, served
by an HTTP server on 127.0.0.1, downloaded, checked, decoded to 64x64 crops once and read back from the cache."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_data_sources import isolated, md5, serve  # noqa: F401 (fixtures)
from vaelab.data import DATASETS, cache_dir, load_dataset, sources
from vaelab.errors import DataError

REPO = Path(__file__).resolve().parents[1]
NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
         "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
         "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
         "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
PARTITION = (0, 0, 1, 2, 0, 2, 0, 1, 0, 2, 0, 0)  # 000001.jpg .. 000012.jpg
FILES = [f"{i:06d}.jpg" for i in range(1, len(PARTITION) + 1)]
TRAIN = [f for f, p in zip(FILES, PARTITION) if p == 0]
TEST = [f for f, p in zip(FILES, PARTITION) if p == 2]
ZIP, PART, ATTR = "img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt"


def jpeg(seed: int, size=(178, 218)) -> bytes:
    """A 178x218 JPEG (quality 95) of smooth, distinct content: a gradient, a seeded colour and a seeded block."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * 255 // w), (yy * 255 // h), np.full((h, w), rng.integers(0, 256))], axis=-1)
    top, left = rng.integers(0, h - 40), rng.integers(0, w - 40)
    a[top:top + 40, left:left + 40] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("img_align_celeba/", b"")
        for name, data in members.items():
            zf.writestr(f"img_align_celeba/{name}", data)


def write_celeba(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The three files in `folder`; returns file name -> its 40 attribute values (-1/1)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_zip(folder / ZIP, {f: jpeg(seed * 100 + i) for i, f in enumerate(FILES)})
    (folder / PART).write_text("".join(f"{f} {p}\n" for f, p in zip(FILES, PARTITION)))
    rng = np.random.default_rng(seed)
    attrs = {f: rng.choice([-1, 1], len(NAMES)) for f in FILES}
    # the authors' layout: a space before each value, two before a 1 (so the columns line up)
    rows = "".join(f"{f}" + "".join(f"{v:3d}" for v in attrs[f]) + "\n" for f in FILES)
    (folder / ATTR).write_text(f"{len(FILES)}\n{' '.join(NAMES)} \n{rows}")
    return attrs


def crop64(data: bytes) -> np.ndarray:
    """The usual 64x64 centre crop, computed here: (3, 64, 64) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        small = img.convert("RGB").crop((15, 35, 163, 183)).resize((64, 64), Image.Resampling.BILINEAR)
    return np.asarray(small).transpose(2, 0, 1)


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n.split("/")[-1]: zf.read(n) for n in zf.namelist() if not n.endswith("/")}


def npy_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".npy", ".tmp")))


def test_celeba_downloads_checks_decodes_and_caches(serve, tmp_path, monkeypatch):  # noqa: F811
    site = tmp_path / "site" / "celeba"
    attrs = write_celeba(site)
    for f in (ZIP, PART, ATTR):
        monkeypatch.setitem(sources.MD5["celeba"], f, md5(site / f))
    monkeypatch.setenv("VAELAB_MIRROR", serve(tmp_path / "site"))
    assert "celeba" in DATASETS
    s = load_dataset("celeba", progress=False)
    images = members(site / ZIP)
    for ds, names in ((s.train, TRAIN), (s.test, TEST)):
        assert (len(ds), ds.sample_shape, ds.x.dtype, ds.scale) == (len(names), (3, 64, 64), torch.uint8, 255.0)
        assert ds.y is None and ds.classes is None and ds.name == "celeba"
        want = np.stack([crop64(images[f]) for f in names])  # the partition file's order
        assert np.array_equal(ds.x.numpy(), want)
        assert ds.factor_names == NAMES
        assert torch.equal(ds.factors, torch.tensor(np.stack([(attrs[f] + 1) / 2 for f in names])))
    assert len(TRAIN) == 7 and len(TEST) == 3  # partition 1 (validation) is in neither split

    folder = cache_dir() / "celeba"
    caches = npy_files(folder)
    assert [c.split(".")[1] for c in caches] == ["test", "train"] and all(c.endswith(".64x64." + c.split(".")[3]
                                                                                 + ".npy") for c in caches)
    assert sorted(p.name for p in folder.iterdir()) == sorted([ATTR, ZIP, PART] + caches)
    written = {c: (folder / c).stat().st_mtime_ns for c in caches}

    time.sleep(0.01)
    again = load_dataset("celeba", download=False, progress=False)  # from the cache: nothing decoded or written
    assert {c: (folder / c).stat().st_mtime_ns for c in npy_files(folder)} == written
    assert torch.equal(again.train.x, s.train.x) and torch.equal(again.test.x, s.test.x)
    assert torch.equal(again.test.factors, s.test.factors)
    maps = Path("/proc/self/maps").read_text()
    assert all(str(folder / c) in maps for c in caches)  # the pixels are mapped from the cache files, not read


def test_a_changed_archive_is_decoded_afresh(tmp_path):
    folder = tmp_path / "data" / "celeba"
    write_celeba(folder, seed=0)
    first = load_dataset("celeba", tmp_path / "data", download=False, progress=False)
    old = npy_files(folder)
    assert len(old) == 2
    write_celeba(folder, seed=1)  # other pictures, the same names
    second = load_dataset("celeba", tmp_path / "data", download=False, progress=False)
    new = npy_files(folder)
    assert len(new) == 2 and not set(new) & set(old)  # the old caches are replaced, not kept beside
    want = np.stack([crop64(members(folder / ZIP)[f]) for f in TRAIN])
    assert np.array_equal(second.train.x.numpy(), want) and not torch.equal(second.train.x, first.train.x)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_a_read_only_folder_caches_in_the_user_cache(tmp_path):
    folder = tmp_path / "data" / "celeba"
    write_celeba(folder)
    folder.chmod(0o555)
    try:
        s = load_dataset("celeba", tmp_path / "data", download=False, progress=False)
    finally:
        folder.chmod(0o755)
    assert len(s.train) == 7 and npy_files(folder) == []
    assert len(npy_files(cache_dir() / "celeba")) == 2


def test_the_wrong_checksum_is_refused_and_nothing_kept(serve, tmp_path, monkeypatch):  # noqa: F811
    site = tmp_path / "site" / "celeba"
    write_celeba(site)
    url = serve(tmp_path / "site")
    monkeypatch.setenv("VAELAB_MIRROR", url)
    with pytest.raises(DataError) as e:  # the authors' MD5, which a file written here cannot have
        load_dataset("celeba", progress=False)
    assert (f"{url}/celeba/img_align_celeba.zip: MD5 mismatch: got {md5(site / ZIP)}, expected "
            "00d2c5bc6d35e252742224ab0c1e8fcb") in str(e.value)
    assert "https://graal.ift.ulaval.ca/public/celeba/" in str(e.value)  # where to get the files by hand
    assert not (cache_dir() / "celeba").exists()  # nothing kept, not even a temporary file


def _not_a_zip(folder):
    (folder / ZIP).write_bytes(b"this is not a zip archive\n")


def _truncated_zip(folder):
    data = (folder / ZIP).read_bytes()
    (folder / ZIP).write_bytes(data[: len(data) // 2])


def _replace_member(folder, name, data):
    images = members(folder / ZIP)
    if data is None:
        del images[name]
    else:
        images[name] = data
    write_zip(folder / ZIP, images)


def _edit_line(folder, fname, number, text):
    lines = (folder / fname).read_text().splitlines()
    lines[number - 1] = text
    (folder / fname).write_text("\n".join(lines) + "\n")


ERRORS = {
    "not a zip": (_not_a_zip, lambda f: f"{f / ZIP}: not a readable zip archive (BadZipFile: File is not a zip "
                                        "file); expected CelebA's img_align_celeba.zip. Delete it and download it "
                                        "again"),
    "truncated zip": (_truncated_zip, lambda f: f"{f / ZIP}: not a readable zip archive"),
    "missing member": (lambda f: _replace_member(f, "000005.jpg", None),
                       lambda f: f"{f / ZIP}: has no member img_align_celeba/000005.jpg, which "
                                 "list_eval_partition.txt lists"),
    "missing validation member": (lambda f: _replace_member(f, "000003.jpg", None),
                                  lambda f: f"{f / ZIP}: has no member img_align_celeba/000003.jpg"),
    "broken jpeg": (lambda f: _replace_member(f, "000005.jpg", jpeg(5)[:300]),
                    lambda f: f"{f / ZIP}: member img_align_celeba/000005.jpg is not a readable JPEG"),
    "not a jpeg": (lambda f: _replace_member(f, "000002.jpg", b"\x89PNG\r\n\x1a\n" + bytes(200)),
                   lambda f: f"{f / ZIP}: member img_align_celeba/000002.jpg is not a readable JPEG"),
    "wrong size": (lambda f: _replace_member(f, "000009.jpg", jpeg(9, size=(200, 200))),
                   lambda f: f"{f / ZIP}: member img_align_celeba/000009.jpg is 200x200 pixels; expected 178x218, "
                             "CelebA's aligned-and-cropped images (img_align_celeba.zip), not the in-the-wild "
                             "originals"),
    "partition line": (lambda f: _edit_line(f, PART, 4, "000004.jpg 3"),
                       lambda f: f"{f / PART}, line 4: '000004.jpg 3' is malformed; expected an image file name "
                                 "and its partition 0, 1 or 2 (e.g. '000001.jpg 0')"),
    "attribute count line": (lambda f: _edit_line(f, ATTR, 1, "twelve"),
                             lambda f: f"{f / ATTR}, line 1: 'twelve' is malformed; expected the number of images"),
    "attribute names": (lambda f: _edit_line(f, ATTR, 2, " ".join(NAMES[:39])),
                        lambda f: f"{f / ATTR}, line 2: "),
    "attribute value": (lambda f: _edit_line(f, ATTR, 7, "000005.jpg" + "  0" * 40),
                        lambda f: f"{f / ATTR}, line 7: '000005.jpg  0  0"),
    "attribute row names": (lambda f: _edit_line(f, ATTR, 9, "000077.jpg" + "  1" * 40),
                            lambda f: f"{f / ATTR}: its rows do not match the file names of {f / PART}: 000007.jpg "
                                      f"has no row in {f / ATTR}; the two files are from different sets"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_broken_files_give_errors_that_name_them(tmp_path, case):
    folder = tmp_path / "data" / "celeba"
    write_celeba(folder)
    damage, message = ERRORS[case]
    damage(folder)
    with pytest.raises(DataError) as e:
        load_dataset("celeba", tmp_path / "data", download=False, progress=False)
    assert message(folder) in str(e.value)
    assert npy_files(folder) == [] and not (cache_dir() / "celeba").exists()  # no cache, no temporary file


def test_train_on_celeba_from_a_data_dir(tmp_path):
    """`vaelab train --dataset celeba` in a real subprocess, the files placed in DIR/celeba/ (no download)."""
    write_celeba(tmp_path / "data" / "celeba")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), VAELAB_MIRROR="http://127.0.0.1:9/",
               OMP_NUM_THREADS="1")
    env.pop("VAELAB_DATA", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "vaelab", "train", "--dataset", "celeba", "--data-dir",
                           tmp_path / "data", "--model", "vae", "--arch", "conv", "--latent-dim", "4",
                           "--batch-size", "4", "--epochs", "1", "--no-progress", "--out", out],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["data"]["dataset"] == "celeba"
    assert len(npy_files(tmp_path / "data" / "celeba")) == 2
