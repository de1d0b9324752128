"""The TPU pre-flight check: train.py's programs compiled for Cloud TPU slices, here.

It needs the TPU compiler (``pip install -e '.[tpu]'``), which needs jax >=
0.11 and so Python >= 3.12: CI runs these on the newest stack only.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip(
    "libtpu", reason="no TPU compiler: pip install -e '.[tpu]' (Python >= 3.12, the newest stack)"
)

from cnnflat_jax.configs import tpu  # noqa: E402
from cnnflat_jax.tools import tpu_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cnn_training_flops_per_image():
    """The default CNN's multiply-adds, counted by hand (2 FLOPs each), times 3
    for training (the forward pass, and two as large backward: inputs and weights)."""
    conv1 = 28 * 28 * (3 * 3 * 1) * 32
    conv2 = 14 * 14 * (3 * 3 * 32) * 64
    dense = 7 * 7 * 64 * 256 + 256 * 10
    return 3 * 2 * (conv1 + conv2 + dense)


@pytest.mark.parametrize(
    "topology, chips, processes",
    [("v5e:2x2", 4, 1), ("v5e:4x4", 16, 4), ("v5p:2x2x2", 8, 2), ("v6e:2x2", 4, 1)],
)
def test_the_tpu_config_compiles_for_each_slice(topology, chips, processes):
    report = tpu_check.check(tpu.get_config(), topology)
    assert (report.chips, report.processes) == (chips, processes)
    # The compiled step's FLOPs are the model's (plus a few percent: softmax, Adam, sums).
    per_image = report.step_flops / report.images_per_step
    assert 1.0 <= per_image / cnn_training_flops_per_image() < 1.06
    # Two: the batch's example count (the loss is a mean over the global batch), then
    # the gradients and the metric sums, combined into one.
    assert report.collectives == {"all-reduce": 2}
    hbm = tpu_check.CHIPS[topology.split(":")[0]].hbm_gib * 2**30
    for sizes in report.memory.values():
        assert 0 < tpu_check._resident(sizes) < hbm
        assert sizes["argument"] > 0 and sizes["code"] > 0
    assert f"{topology}: {chips} chips, {processes} host process(es)" in str(report)


def test_a_population_and_bfloat16_compile_and_are_reported():
    config = tpu.get_config()
    config.population.size = 4
    config.compute_dtype = "bfloat16"
    report = tpu_check.check(config, "v5e:2x2")
    assert report.images_per_step == 4 * config.batch_size
    assert report.compute_dtype == "bfloat16" and "compute bfloat16" in str(report)
    per_image = report.step_flops / report.images_per_step
    assert 1.0 <= per_image / cnn_training_flops_per_image() < 1.06


def test_a_batch_that_does_not_split_is_refused():
    config = tpu.get_config()
    config.batch_size = 1000
    with pytest.raises(tpu_check.PreflightError, match="does not split over 16 chips"):
        tpu_check.check(config, "v5e:4x4")


def test_a_model_too_large_for_a_chip_is_one_error_line():
    # An eval batch of 2^24 images: a quarter of it on each chip, whose first
    # convolution's output alone (28 x 28 x 32 float32 per image) is 400 GiB.
    result = subprocess.run(
        [sys.executable, "-m", "cnnflat_jax.tpu_check", "--config", "configs/tpu.py",
         "--topology", "v5e:2x2", f"--config.eval_batch_size={2**24}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "the eval program needs" in errors[0]
    assert "more than a v5e chip's 16.000 GiB of HBM" in errors[0]


def test_an_unknown_topology_is_named():
    with pytest.raises(tpu_check.PreflightError, match="v9z:2x2"):
        tpu_check.check(tpu.get_config(), "v9z:2x2")


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config.nosuch=1"], "error: config.nosuch=1: unknown field; allowed: "),
        (["--config", "nosuch"], "error: config file nosuch: OSError"),
        (["--config.batch_size=abc"], "error: config.batch_size=abc: invalid literal"),
        (["--image_shape=a,b,c"], "error: --image_shape=a,b,c --examples=60000,10000: not H,W,C"),
    ],
)  # fmt: skip
def test_a_bad_flag_or_config_is_one_error_line(args, expected):
    result = subprocess.run(
        [sys.executable, "-m", "cnnflat_jax.tpu_check", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith(expected)


def test_collectives_are_counted_past_comments_in_their_types():
    hlo = """
  %all-reduce.1 = (f32[10]{0}, f32[3]{0}, s32[], f32[], f32[], /*index=5*/f32[4]{0}) all-reduce(f32[10]{0} %a, f32[3]{0} %b), to_apply=%add
  ROOT %all-gather-start.2 = (f32[4]{0}, f32[8]{0}) all-gather-start(f32[4]{0} %c), dimensions={0}
  %all-gather-done.2 = f32[8]{0} all-gather-done((f32[4]{0}, f32[8]{0}) %all-gather-start.2)
  %add.3 = f32[2]{0} add(f32[2]{0} %p, f32[2]{0} %q)
"""  # noqa: E501
    assert tpu_check.count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1}


def test_per_example_clipping_reports_its_gradient_all_reduce():
    config = tpu.get_config()
    config.per_example.clip_norm = 1.0
    # A slice no other test compiles for: the suite's persistent compilation cache
    # would otherwise hold its eval program, which a compile-only client cannot load.
    report = tpu_check.check(config, "v5e:2x4")
    assert report.collectives.get("all-reduce", 0) >= 1, report.collectives


@pytest.mark.parametrize("topology", ["v5e:0x0", "v5e:4x4x4", "v5p:2x2"])
def test_a_slice_of_the_wrong_shape_is_refused_before_libtpu_sees_it(topology):
    # libtpu ends the process on these (SIGFPE for 0x0, an abort for 4x4x4).
    with pytest.raises(tpu_check.PreflightError, match=rf"TPU topology '{topology}': a v5. slice"):
        tpu_check.check(tpu.get_config(), topology)


def test_terabytes_of_temporaries_are_named_in_any_unit():
    config = tpu.get_config()
    config.batch_size = 2**30
    with pytest.raises(tpu_check.PreflightError, match=r"needs [\d.]+TiB of temporaries per chip"):
        tpu_check.check(config, "v5e:2x2")
