"""Ground-truth factors: on every dataset (checked, kept by subsets and splits), from the user's .npy/.csv/.npz
files (every bad input a DataError with the file, what it found and what was expected), and `--factors FILE`
on `vaelab train` and on the commands that open a run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from vaelab.data import ArrayDataset, DataSplits, attach_factors, load_dataset, load_factors, standardize
from vaelab.data.arrays import CodeDataset, split
from vaelab.errors import DataError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def toy(n=6, factors=None, names=None) -> ArrayDataset:
    x = torch.arange(n * 4, dtype=torch.uint8).reshape(n, 1, 2, 2)
    return ArrayDataset(x, torch.arange(n) % 2, 255.0, ["a", "b"], "toy", factors=factors, factor_names=names)


def message(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------- on a dataset


def test_a_dataset_keeps_its_factors_through_subsets_and_splits():
    f = np.arange(12.0).reshape(6, 2)
    ds = toy(factors=f, names=["size", "angle"])
    assert ds.factors.dtype == torch.float64 and ds.factors.shape == (6, 2) and ds.factor_names == ["size", "angle"]
    sub = ds.subset(torch.tensor([5, 0]))
    assert sub.factors.tolist() == [[10, 11], [0, 1]] and sub.factor_names == ["size", "angle"]
    assert sub.factors_of([1]).tolist() == [[0, 1]]
    parts = split(ds, 0.5, seed=0)
    train_idx, test_idx = parts.source_index
    assert torch.equal(parts.train.factors, ds.factors[train_idx]) and torch.equal(parts.test.factors,
                                                                                   ds.factors[test_idx])
    assert torch.equal(parts.train.x, ds.x[train_idx])  # in step with the samples
    a, b, _, _ = standardize(parts.train.subset(slice(None)), parts.test)  # tabular or not, the factors stay
    assert torch.equal(a.factors, parts.train.factors) and b.factor_names == ["size", "angle"]
    codes = CodeDataset(torch.zeros(6, 1, 2, 2, dtype=torch.int64), factors=f, factor_names=["size", "angle"])
    assert codes.subset([3]).factors.tolist() == [[6, 7]]
    plain = toy()
    assert plain.factors is None and plain.factor_names is None and plain.subset([0]).factors is None
    named = plain.with_factors(torch.ones(6, 1), ["one"])
    assert named.factors.shape == (6, 1) and named.x is plain.x and plain.factors is None
    assert named.with_factors(None).factors is None
    assert "factors size, angle" in repr(ds) and "1 factor)" in repr(toy(factors=np.zeros((6, 1))))


def test_bad_factors_on_a_dataset_are_errors():
    with pytest.raises(DataError) as e:
        toy(factors=np.zeros((5, 2)))
    assert message(e) == ("dataset 'toy': factors have shape (5, 2); expected (6, F): one row of F factor values "
                          "per sample")
    with pytest.raises(DataError) as e:
        toy(factors=np.zeros(6))
    assert message(e) == ("dataset 'toy': factors have shape (6,); expected (6, F): one row of F factor values "
                          "per sample")
    bad = np.zeros((6, 2))
    bad[2, 1] = np.nan
    with pytest.raises(DataError) as e:
        toy(factors=bad)
    assert message(e) == "dataset 'toy': factor 1 of sample 2 is nan; every factor value must be a finite number"
    with pytest.raises(DataError) as e:
        toy(factors=np.zeros((6, 2)), names=["a"])
    assert message(e) == ("dataset 'toy': 1 factor names ['a'] for 2 factors (columns); expected one name per "
                          "column")
    with pytest.raises(DataError) as e:
        toy(factors=np.zeros((6, 2)), names=["a", "a"])
    assert message(e) == "dataset 'toy': factor names ['a', 'a'] must be distinct and non-empty"
    with pytest.raises(DataError) as e:
        toy(names=["a"])
    assert message(e) == "dataset 'toy': factor_names ['a'] given without factors"
    with pytest.raises(DataError, match="factors must be numbers"):
        toy(factors=[["x"]] * 6)


# ----------------------------------------------------------------------------------------- the files


def test_npy_and_csv_factor_files(tmp_path):
    values = np.array([[0, 0.5], [1, 0.75], [2, 1.0]])
    np.save(tmp_path / "f.npy", values)
    f, names = load_factors(tmp_path / "f.npy", 3, "dataset 'toy'")
    assert f.dtype == torch.float64 and torch.equal(f, torch.from_numpy(values)) and names is None
    np.save(tmp_path / "one.npy", np.array([3, 1, 2], dtype=np.int8))  # (N,): one factor; integers are fine
    f, _ = load_factors(tmp_path / "one.npy")
    assert f.tolist() == [[3], [1], [2]]
    (tmp_path / "f.csv").write_text("\ufeffshape, scale\n0,0.5\n\n1,0.75\n2,1e0\n", encoding="utf-8")
    f, names = load_factors(tmp_path / "f.csv", 3)
    assert names == ["shape", "scale"] and torch.equal(f, torch.from_numpy(values))


def csv_error(tmp_path, text: str, n=None) -> str:
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_factors(path, n, "dataset 'toy'")
    return message(e).replace(str(path), "FILE")


def npy_error(tmp_path, array, n=None) -> str:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError) as e:
        load_factors(path, n, "dataset 'toy'")
    return message(e).replace(str(path), "FILE")


def test_every_bad_npy_file_is_an_error(tmp_path):
    assert npy_error(tmp_path, np.zeros((3, 2)), n=4) == ("FILE: holds 3 rows of factors, but dataset 'toy' has 4 "
                                                          "samples; expected one row per sample")
    nan = np.zeros((3, 2))
    nan[1, 0] = np.nan
    assert npy_error(tmp_path, nan) == "FILE: row 1, factor 0 is nan; expected finite numbers (1 value(s) are not)"
    inf = np.zeros((3, 2))
    inf[2, 1] = -np.inf
    assert npy_error(tmp_path, inf) == "FILE: row 2, factor 1 is -inf; expected finite numbers (1 value(s) are not)"
    assert npy_error(tmp_path, np.zeros((2, 2, 2))) == (
        "FILE: holds an array of shape (2, 2, 2); expected (N, F): one row of F factor values per sample (or (N,) "
        "for a single factor)")
    assert npy_error(tmp_path, np.zeros((3, 0))) == ("FILE: holds an array of shape (3, 0); expected at least one "
                                                     "sample (row) and one factor (column)")
    assert npy_error(tmp_path, np.array([["a", "b"]])) == ("FILE: has dtype <U1; expected a plain numeric array "
                                                           "(integers or floats)")
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="holds Python objects"):
        load_factors(path)
    np.save(tmp_path / "whole.npy", np.zeros((4, 2)))
    (tmp_path / "short.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_factors(tmp_path / "short.npy")


def test_every_bad_csv_file_is_an_error(tmp_path):
    assert csv_error(tmp_path, "shape,scale\n0,0.5\n1,big\n") == "FILE: row 3, factor 'scale' holds 'big'; expected a number"
    assert csv_error(tmp_path, "shape,scale\n0,\n") == "FILE: row 2, factor 'scale' is empty; expected a number"
    assert csv_error(tmp_path, "shape,scale\n0,nan\n") == ("FILE: row 2, factor 'scale' holds 'nan'; expected a finite "
                                                           "number")
    assert csv_error(tmp_path, "shape,scale\n0,1\n1,inf\n") == ("FILE: row 3, factor 'scale' holds 'inf'; expected a "
                                                                "finite number")
    assert csv_error(tmp_path, "shape,scale\n0,1\n1,2\n", n=3) == ("FILE: holds 2 rows of factors, but dataset 'toy' "
                                                                   "has 3 samples; expected one row per sample")
    assert csv_error(tmp_path, "shape,scale\n0,1\n1,2,3\n") == ("FILE: row 3 has 3 cells; expected 2, one per factor "
                                                                "named in the header")
    assert csv_error(tmp_path, "0,1\n1,2\n") == ("FILE: the first row (0, 1) holds numbers; expected a header row of "
                                                 "factor names (e.g. shape,scale), then one row of factor values per "
                                                 "sample")
    assert csv_error(tmp_path, "a,a\n0,1\n") == ("FILE: the header row (a, a) must name each factor once; expected "
                                                 "distinct, non-empty names")
    assert csv_error(tmp_path, "a,\n0,1\n") == ("FILE: the header row (a, ) must name each factor once; expected "
                                                "distinct, non-empty names")
    assert csv_error(tmp_path, "shape,scale\n") == ("FILE: has a header row but no rows of factor values; expected one "
                                                    "row per sample")
    assert csv_error(tmp_path, "\n\n") == ("FILE: is empty; expected a header row of factor names, then one row of "
                                           "factor values per sample")
    path = tmp_path / "latin1.csv"
    path.write_bytes("größe\n1\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_factors(path)


def test_missing_and_unknown_files_are_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_factors(tmp_path / "nope.npy")
    assert message(e) == (f"{tmp_path / 'nope.npy'}: no such factors file; expected an .npy array (N, F) or a .csv "
                          "file with a header row of factor names, one row of factor values per sample")
    (tmp_path / "f.txt").write_text("1\n")
    with pytest.raises(DataError) as e:
        load_factors(tmp_path / "f.txt")
    assert message(e) == (f"{tmp_path / 'f.txt'}: unsupported kind of factors file '.txt'; expected an .npy array "
                          "(N, F) or a .csv file with a header row of factor names or an .npz with 'factors' (or "
                          "'factors_train' and 'factors_test')")


# -------------------------------------------------------------------------------------- attach_factors


def test_factors_follow_the_source_order_of_data_vaelab_splits(tmp_path):
    digits = load_digits()
    n = len(digits.target)
    table = np.column_stack([digits.target, np.arange(n)])  # factor 1: the sample's position in the source
    np.save(tmp_path / "f.npy", table)
    data = attach_factors(load_dataset("digits"), tmp_path / "f.npy")
    train_idx, test_idx = data.source_index
    assert torch.equal(data.test.factors[:, 1].long(), test_idx) and torch.equal(data.train.factors[:, 1].long(),
                                                                                 train_idx)
    assert torch.equal(data.train.factors[:, 0].long(), data.train.y)  # each row landed on its own sample
    with pytest.raises(DataError) as e:
        attach_factors(load_dataset("digits"), tmp_path / "f.npy").train.with_factors(np.zeros((2, 1)))
    assert "expected (1617, F)" in message(e)
    np.save(tmp_path / "short.npy", table[:-1])
    with pytest.raises(DataError) as e:
        attach_factors(load_dataset("digits"), tmp_path / "short.npy")
    assert message(e) == (f"{tmp_path / 'short.npy'}: holds 1796 rows of factors, but dataset 'digits' (1617 train + "
                          "180 test samples) has 1797 samples; expected one row per sample, in the order of the "
                          "data's samples before vaelab split them into train and test")


def explicit_splits(tmp_path) -> DataSplits:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.random((5, 3)), x_test=rng.random((2, 3)))
    return load_dataset(tmp_path / "data.npz")


def test_factors_of_data_with_its_own_splits_go_train_then_test(tmp_path):
    data = explicit_splits(tmp_path)
    assert data.source_index is None
    (tmp_path / "f.csv").write_text("k\n" + "\n".join(str(i) for i in range(7)) + "\n")
    out = attach_factors(data, tmp_path / "f.csv")
    assert out.train.factors.ravel().tolist() == [0, 1, 2, 3, 4] and out.test.factors.ravel().tolist() == [5, 6]
    assert out.train.factor_names == out.test.factor_names == ["k"] and torch.equal(out.train.x, data.train.x)
    np.savez(tmp_path / "split.npz", factors_train=np.ones((5, 2)), factors_test=np.zeros((2, 2)))
    out = attach_factors(data, tmp_path / "split.npz")
    assert out.train.factors.sum() == 10 and out.test.factors.shape == (2, 2) and out.test.factor_names is None
    np.savez(tmp_path / "one.npz", factors=np.arange(7.0))
    assert attach_factors(data, tmp_path / "one.npz").test.factors.ravel().tolist() == [5, 6]
    np.save(tmp_path / "long.npy", np.zeros((8, 1)))
    with pytest.raises(DataError) as e:
        attach_factors(data, tmp_path / "long.npy")
    assert message(e) == (f"{tmp_path / 'long.npy'}: holds 8 rows of factors, but dataset 'data' (5 train + 2 test "
                          "samples) has 7 samples; expected one row per sample, the train samples first, then the "
                          "test samples")


def test_bad_npz_factor_files_are_errors(tmp_path):
    data = explicit_splits(tmp_path)
    cases = [({"factors_train": np.ones((5, 2))},
              "has arrays ['factors_train']; factors for each split need both factors_train and factors_test"),
             ({"factors_train": np.ones((4, 2)), "factors_test": np.ones((2, 2))},
              "factors_train holds 4 rows, but dataset 'data' (5 train + 2 test samples) has 5 samples in that split; "
              "expected one row per sample"),
             ({"factors_train": np.ones((5, 2)), "factors_test": np.ones((2, 3))},
              "factors_train has 2 factors (columns) but factors_test has 3; both splits need the same factors"),
             ({"z": np.ones(7)},
              "has arrays ['z']; expected 'factors' (one row per sample), or 'factors_train' and 'factors_test'"),
             ({"factors": np.ones(6)},
              "factors holds 6 rows, but dataset 'data' (5 train + 2 test samples) has 7 samples; expected one row "
              "per sample, the train samples first, then the test samples")]
    for arrays, expected in cases:
        np.savez(tmp_path / "f.npz", **arrays)
        with pytest.raises(DataError) as e:
            attach_factors(data, tmp_path / "f.npz")
        assert message(e) == f"{tmp_path / 'f.npz'}: {expected}"
    bad = np.ones((5, 2))
    bad[0, 0] = np.nan
    np.savez(tmp_path / "f.npz", factors_train=bad, factors_test=np.ones((2, 2)))
    with pytest.raises(DataError) as e:
        attach_factors(data, tmp_path / "f.npz")
    assert message(e) == (f"{tmp_path / 'f.npz'} (factors_train): row 0, factor 0 is nan; expected finite numbers "
                          "(1 value(s) are not)")
    with pytest.raises(DataError, match="no such factors file"):
        attach_factors(data, tmp_path / "missing.npz")


# -------------------------------------------------------------------------------------------- the CLI


def test_train_remembers_factors_and_run_commands_attach_them(tmp_path, capsys):
    from vaelab.cli import main
    from vaelab.cli.common import open_run, run_data

    table = np.column_stack([load_digits().target, np.arange(1797) % 5])
    np.save(tmp_path / "f.npy", table)
    run = tmp_path / "run"
    common = ["--preset", "seed-vae", "--epochs", "1", "--no-pictures", "--no-progress", "--dataset", "digits",
              "--out", str(run)]
    assert main(["train", *common, "--factors", str(tmp_path / "short.npy")]) == 1
    assert "short.npy: no such factors file" in capsys.readouterr().err and not (run / "config.json").exists()
    assert main(["train", *common, "--factors", str(tmp_path / "f.npy")]) == 0
    capsys.readouterr()  # what training said (precision auto's choice among it)
    saved = json.loads((run / "config.json").read_text())["data"]
    assert saved["factors"] == str(tmp_path / "f.npy")

    cfg, model = open_run(str(run), trust_code=False)
    args = argparse.Namespace(dataset=None, data_dir=None, factors=None)
    data = run_data(cfg, str(run), model, args)
    assert torch.equal(data.test.factors[:, 0].long(), data.test.y)  # the run's own factors file
    np.save(tmp_path / "g.npy", np.ones((1797, 3)))
    assert run_data(cfg, str(run), model, argparse.Namespace(dataset=None, data_dir=None,
                                                             factors=str(tmp_path / "g.npy"))).test.factors.shape[1] == 3
    np.save(tmp_path / "short.npy", np.ones((10, 3)))
    assert main(["evaluate", str(run), "--factors", str(tmp_path / "short.npy")]) == 1
    assert capsys.readouterr().err == (f"vaelab: error: {tmp_path / 'short.npy'}: holds 10 rows of factors, but "
                                       "dataset 'digits' (1617 train + 180 test samples) has 1797 samples; expected one "
                                       "row per sample, in the order of the data's samples before vaelab split them "
                                       "into train and test\n")
    (tmp_path / "f.npy").unlink()  # the run's factors file went away: commands that need no factors go on
    data = run_data(cfg, str(run), model, args)
    assert data.test.factors is None
    assert "the run's factors file is not usable" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert "training on without factors" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["data"]["factors"] is None
