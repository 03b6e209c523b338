"""benchmarks/speed.py's arithmetic: steady epochs, and with --rounds each run against the Keras run of its round."""

import importlib.util
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raw(speed, kind, name, epochs, rnd, rss=500):
    row = speed.summarize(f"seed-conv-ae {name}", "seed-conv-ae",
                          {"epoch_s": epochs, "test_loss": 0.07, "test_bce": 0.07, "peak_rss_mb": rss})
    row.update(kind=kind, precision=None if kind != "vaelab" else "fp32", round=rnd)
    return row


def test_steady_epoch_is_the_median_after_the_first(speed):
    row = _raw(speed, "keras", "Keras (tutorial)", [30.0, 14.0, 21.0, 15.0], 1)
    assert row["steady_epoch_s"] == 15.0 and row["first_epoch_s"] == 30.0
    assert row["images_per_s"] == round(70_000 / 15.0)
    assert row["peak_fraction"] == round(speed.epoch_bound_s("seed-conv-ae") / 15.0, 3)


def test_rounds_compare_each_run_with_the_keras_run_of_its_round(speed):
    raw = [_raw(speed, "keras", "Keras (tutorial)", [16.0, 14.0, 14.0], 1, rss=1400),
           _raw(speed, "vaelab", "vaelab fp32", [10.0, 7.0, 7.0], 1),
           _raw(speed, "keras", "Keras (tutorial)", [16.0, 21.0, 21.0], 2, rss=1450),
           _raw(speed, "vaelab", "vaelab fp32", [10.0, 10.5, 10.5], 2, rss=520),
           _raw(speed, "keras", "Keras (tutorial)", [16.0, 20.0, 20.0], 3),
           _raw(speed, "vaelab", "vaelab fp32", [10.0, 8.0, 8.0], 3)]
    keras, ours = speed.combine(raw)
    assert keras["steady_by_round"] == [14.0, 21.0, 20.0] and keras["steady_epoch_s"] == 20.0
    assert keras["vs_keras_by_round"] == [1.0, 1.0, 1.0] and keras["peak_rss_mb"] == 1450
    # per round 14/7, 21/10.5, 20/8; the median of the ratios, not the ratio of the medians (20/8 = 2.5)
    assert ours["vs_keras_by_round"] == [2.0, 2.0, 2.5] and ours["vs_keras"] == 2.0
    assert ours["steady_epoch_s"] == 8.0 and ours["rounds"] == 3 and "round" not in ours


def test_a_round_without_its_keras_run_has_no_ratio(speed, capsys):
    raw = [_raw(speed, "vaelab", "vaelab fp32", [10.0, 9.0], 1),
           _raw(speed, "keras", "Keras (tutorial)", [16.0, 18.0], 2),
           _raw(speed, "vaelab", "vaelab fp32", [10.0, 9.5], 2)]
    ours, _ = speed.combine(raw)  # rows in the order the runs first appear
    assert ours["vs_keras_by_round"] == [1.89] and ours["vs_keras"] == 1.89
    speed.print_table(speed.combine(raw))
    assert "1.89x" in capsys.readouterr().out
