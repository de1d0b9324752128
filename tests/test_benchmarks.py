"""The benchmark scripts run end to end (tiny settings; numbers not checked)."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest
from helpers import idx_config, write_idx_dataset

from cnnflat_jax.data import input_pipeline
from cnnflat_jax.run import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config", "configs/smoke.py", "--rounds", "1", "--steps", "2"]


@pytest.mark.skipif(
    not os.path.isdir(input_pipeline.DEBIAN_IDX_DIRS["fashion_mnist"]),
    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)",
)
@pytest.mark.parametrize(
    "script,args,expected",
    [
        (
            "train_throughput",
            [*SMOKE, "--time_to_accuracy", "--accuracy_config", "configs/smoke.py"],
            "| 91% NOT reached by wall s from `python train.py --config configs/smoke.py`",
        ),
        (
            "step_profile",
            ["--config", "configs/smoke.py", "--steps", "2"],
            "| Conv2D_1 | backward |",
        ),
        (
            "speed_comparison",
            [*SMOKE, "--calls", "1", "--notorch", "--pools", "avg"],
            "### CNN, avg pool (config.model.pool=avg)",
        ),
        ("population_throughput", [*SMOKE, "--sizes", "1,2"], "| 2 |"),
        ("grain_pipeline", ["--config", "configs/smoke.py", "--rounds", "1"], "| grain |"),
        ("sharding_overhead", [*SMOKE, "--devices", "1,8"], "| 8 |"),
        (
            "flatten_experiments",
            ["--quick"],
            "| GAP CNN: cosine |",
        ),
    ],
)
def test_benchmark_runs(script, args, expected, tmp_path):
    if script == "flatten_experiments":
        args = [*args, "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout


def test_conv_profile_runs():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.conv_profile", "--rounds", "1", "--batch", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| conv") == 6


def test_a_trained_spec_exported_to_pytorch_predicts_the_same(tmp_path):
    pytest.importorskip("torch")
    data = write_idx_dataset(tmp_path / "data")
    config = idx_config(data)
    config.model = ml_collections.ConfigDict(
        dict(name="sequential", layers=("conv:4:3", "relu", "max_pool:2", "dropout:0.2",
                                        "flatten", "dense:3", "log_softmax"))
    )  # fmt: skip
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.torch_agreement", "--workdir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "agree on 100.0000% of the images" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "0." in line]
    ours, theirs = (row.split("|")[-2].strip() for row in rows)
    test_accuracy = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ours == theirs == f"{test_accuracy['test_accuracy']:.4f}"
