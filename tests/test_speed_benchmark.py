"""benchmarks/speed.py's arithmetic: steady epochs, and with --rounds each run against the Keras run of its round."""

import importlib.util
import sys
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # importable by name, as pythae's cloudpickle of the encoder's module needs
    spec.loader.exec_module(module)
    return module


def _raw(speed, kind, name, epochs, rnd, rss=500, preset="seed-conv-ae"):
    row = speed.summarize(f"{preset} {name}", preset,
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


def test_each_round_compares_with_the_plain_loop_and_pythae_of_that_round(speed, capsys):
    vae = dict(preset="seed-vae")
    raw = [_raw(speed, "reference", "plain PyTorch loop", [30.0, 28.0, 28.0], 1, **vae),
           _raw(speed, "pythae", "pythae 0.1.2", [30.0, 24.0, 24.0], 1, **vae),
           _raw(speed, "vaelab", "vaelab fp32", [20.0, 14.0, 14.0], 1, **vae),
           _raw(speed, "reference", "plain PyTorch loop", [30.0, 21.0, 21.0], 2, **vae),
           _raw(speed, "pythae", "pythae 0.1.2", [30.0, 30.0, 30.0], 2, **vae),
           _raw(speed, "vaelab", "vaelab fp32", [20.0, 15.0, 15.0], 2, **vae)]
    reference, pythae, ours = speed.combine(raw)
    assert ours["vs_reference_by_round"] == [2.0, 1.4] and ours["vs_reference"] == 1.7
    assert ours["vs_pythae_by_round"] == [round(24 / 14, 2), 2.0] and ours["vs_pythae"] == round((1.71 + 2.0) / 2, 2)
    assert pythae["vs_reference_by_round"] == [round(28 / 24, 2), 0.7] and "vs_keras" not in ours
    speed.print_table([reference, pythae, ours])
    out = capsys.readouterr().out
    assert "vs plain loop" in out and "vs pythae" in out and "1.70x" in out


def test_each_run_is_compared_with_the_fastest_steady_epoch_of_its_rounds_keras_run(speed, capsys):
    raw = [_raw(speed, "keras", "Keras (tutorial)", [9.0, 16.0, 12.0, 20.0], 1),  # the first epoch is not steady
           _raw(speed, "vaelab", "vaelab fp32", [10.0, 6.0, 6.0, 6.0], 1),
           _raw(speed, "keras", "Keras (tutorial)", [30.0, 14.0, 15.0, 21.0], 2),
           _raw(speed, "vaelab", "vaelab fp32", [10.0, 8.0, 8.0, 8.0], 2)]
    keras, ours = speed.combine(raw)
    assert keras["vs_keras_fastest_by_round"] == [round(12 / 16, 2), round(14 / 15, 2)]
    assert ours["vs_keras_by_round"] == [round(16 / 6, 2), round(15 / 8, 2)]
    assert ours["vs_keras_fastest_by_round"] == [2.0, 1.75] and ours["vs_keras_fastest"] == 1.88
    speed.print_table([keras, ours])
    out = capsys.readouterr().out
    assert "vs Keras's fastest epoch" in out and "1.88x (2.00, 1.75)" in out


def test_measured_peaks_give_each_run_its_fraction_of_both(speed, capsys):
    peaks = {"fp32": 150e9, "bf16": 600e9}
    row = speed.summarize("seed-vae vaelab auto (bf16)", "seed-vae",
                          {"epoch_s": [30.0, 20.0], "test_loss": 160.0, "peak_rss_mb": 500}, peaks)
    bound = (60_000 + 10_000 / 3) * 39.9e6  # the epoch's FLOPs
    assert row["peak_fraction"] == round(bound / 150e9 / 20.0, 3) == 0.842
    assert row["peak_fraction_bf16"] == round(bound / 600e9 / 20.0, 3) == 0.211
    row.update(kind="vaelab", precision="auto", round=1)
    (combined,) = speed.combine([row], peaks)
    assert combined["peak_fraction_bf16"] == 0.211
    speed.print_table([combined])
    out = capsys.readouterr().out
    assert "% of bf16 peak" in out and "84%" in out and "21%" in out
    # without measured peaks: the reference machine's fp32 peak alone
    plain = speed.summarize("x", "seed-vae", {"epoch_s": [30.0, 20.0], "test_loss": 160.0, "peak_rss_mb": 500})
    assert plain["peak_fraction"] == round(bound / speed.PEAK_FLOPS / 20.0, 3) and "peak_fraction_bf16" not in plain


def test_measure_peaks_times_both_precisions(speed):
    peaks = speed.measure_peaks(blocks=1, reps=1)
    assert set(peaks) == {"fp32", "bf16"} and peaks["fp32"] > 1e9 and peaks["bf16"] > 1e8


def test_an_auto_run_is_named_by_what_auto_chose(speed):
    chose = {"precision_auto": {"chose": "bf16", "why": "native"}}
    assert speed._vaelab_name("vaelab auto", chose) == "vaelab auto (bf16)"
    assert speed._vaelab_name("vaelab auto", {}) == "vaelab auto"
    assert speed._vaelab_name("vaelab fp32", chose) == "vaelab fp32"


@pytest.mark.slow
@pytest.mark.long
def test_the_pythae_run_trains_the_plain_loops_layers(speed, tmp_path):
    """An epoch of the seed VAE through pythae 0.1.2's TrainingPipeline (needs `pip install --no-deps
    pythae==0.1.2`): its per-epoch clock and its test loss, the same objective as the plain loop's."""
    pytest.importorskip("pythae")
    import argparse
    import os

    data = os.environ.get("VAELAB_TEST_DATA") or str(SPEED.parents[2] / "shared" / "data")
    args = argparse.Namespace(epochs=1, seed=0, data_dir=data)
    res = speed.child_pythae(args)
    assert len(res["epoch_s"]) == 1 and res["epoch_s"][0] > 0
    assert 160 < res["test_loss"] < 215  # nats: 784-pixel BCE + KL after one epoch (191 measured; Keras's 10: 154.7)
