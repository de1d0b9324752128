"""jax.export artifacts of trained runs, and the predict command that serves them."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
from helpers import idx_config, loaded_by, write_idx_dataset
from PIL import Image

from cnnflat_jax.data import idx
from cnnflat_jax.run import trained_run, trainer
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.tools import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"cnnflat_jax.{module}", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def last_record(workdir):
    return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])


def load_exported(workdir):
    return jax.export.deserialize(bytearray((workdir / "export" / "model.jax").read_bytes()))


def png_header(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A PNG signature, header and end, with no pixels: what a decompression bomb shows first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_idx_dataset(root / "data")
    trainer.train_and_evaluate(idx_config(data), str(root / "run"))
    result = run("export", "--workdir", root / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {root / 'run' / 'export' / 'model.jax'}"
    images = idx.read_idx(data / "t10k-images-idx3-ubyte", ndim=3)[..., None]
    labels = idx.read_idx(data / "t10k-labels-idx1-ubyte", ndim=1)
    return root / "run", data, images, labels


def test_the_exported_model_scores_what_the_run_scored(trained):
    workdir, _, images, labels = trained
    exported = load_exported(workdir)
    logits = np.asarray(exported.call(images))  # uint8 NHWC, any batch size
    assert logits.shape == (37, 3)
    assert np.mean(logits.argmax(1) == labels) == pytest.approx(
        last_record(workdir)["test_accuracy"], abs=1e-6
    )
    np.testing.assert_allclose(np.asarray(exported.call(images[:1])), logits[:1], atol=1e-6)
    classes = json.loads((workdir / "export" / "classes.json").read_text())
    assert classes["image_shape"] == [8, 8, 1] and classes["class_names"] == ["0", "1", "2"]


def test_predict_classifies_png_npy_and_idx_files(trained, tmp_path):
    run_dir, data, images, _ = trained
    workdir = tmp_path / "served"  # Only the export: no config, no parameters.
    shutil.copytree(run_dir / "export", workdir / "export")
    Image.fromarray(images[0, :, :, 0]).save(tmp_path / "first.png")
    Image.fromarray(images[1, :, :, 0]).convert("RGB").save(tmp_path / "second.jpg", quality=100)
    np.save(tmp_path / "stack.npy", images[2:7, :, :, 0])
    idx_file = data / "t10k-images-idx3-ubyte"
    result = run(
        "predict", "--workdir", workdir, tmp_path / "first.png", tmp_path / "second.jpg",
        tmp_path / "stack.npy", idx_file,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [name for name, _, _ in lines] == [
        str(tmp_path / "first.png"),
        str(tmp_path / "second.jpg"),
        *(f"{tmp_path / 'stack.npy'}[{i}]" for i in range(5)),
        *(f"{idx_file}[{i}]" for i in range(37)),
    ]
    probabilities = np.asarray(jax.nn.softmax(load_exported(workdir).call(images), axis=-1))
    expected = [str(c) for c in probabilities.argmax(1)]
    assert [label for _, label, _ in lines[-37:]] == expected
    assert lines[0][1] == expected[0] and [x[1] for x in lines[2:7]] == expected[2:7]
    np.testing.assert_allclose(
        [float(p) for _, _, p in lines[-37:]], probabilities.max(1), atol=1e-4
    )


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("notes.png", b"not an image", "notes.png: cannot read it as an image"),
        ("wide.npy", np.zeros((8, 9), np.uint8), "wide.npy: images of shape (8, 9, 1), but the"),
        ("float.npy", np.zeros((8, 8), np.float32), "float.npy: pixels are float32, not uint8"),
        ("missing.png", None, "missing.png: cannot read it as an image"),
        ("empty.npy", b"", "empty.npy: cannot read it as an image"),
        ("huge.npy", "header only", "huge.npy: cannot read it as an image"),
        ("none.npy", np.zeros((0, 8, 8), np.uint8), "none.npy: a stack of no images"),
        ("bomb.png", png_header(20000, 20000), "bomb.png: "),
        ("big.png", png_header(9000, 9000), "big.png: 9000x9000 pixels, more than the 67,108,864"),
        ("wide.png", png_header(8, 8, bit_depth=32), "wide.png: cannot read it as an image"),
    ],
)  # fmt: skip
def test_a_file_predict_cannot_read_is_one_error_line(trained, tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):  # A header claiming 10^11 images, and no pixels.
        with open(path, "wb") as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (10**11, 8, 8)}
            np.lib.format.write_array_header_1_0(f, header)
    elif content is not None:
        np.save(path, content)
    result = run("predict", "--workdir", trained[0], path)
    assert result.returncode == 1
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


def test_fifos_and_devices_are_refused_without_waiting_on_them(trained, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    for path in (tmp_path / "pipe.png", "/dev/zero"):
        result = run("predict", "--workdir", trained[0], path)
        assert result.returncode == 1 and result.stderr == f"error: {path}: not a regular file\n"


def test_sixteen_bit_pictures_are_scaled_to_eight_bits_not_cut(trained, tmp_path):
    image = trained[2][0, :, :, 0]
    Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # x -> 257 x.
    with Image.open(tmp_path / "deep.png") as saved:
        assert saved.mode.startswith("I;16")
    ((_, read),) = predict.read_images(str(tmp_path / "deep.png"), (8, 8, 1))
    np.testing.assert_array_equal(read[..., 0], image)
    Image.fromarray(image.astype(np.int32) * 1000, mode="I").save(tmp_path / "int32.tif")
    with pytest.raises(predict.UnreadableImageError, match="32-bit"):
        predict.read_images(str(tmp_path / "int32.tif"), (8, 8, 1))


def test_a_picture_as_tall_as_its_channels_is_one_image_not_a_stack(tmp_path):
    rgb = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)  # H == C == 3.
    Image.fromarray(rgb).save(tmp_path / "strip.png")
    ((name, read),) = predict.read_images(str(tmp_path / "strip.png"), (3, 5, 3))
    assert name == str(tmp_path / "strip.png")
    np.testing.assert_array_equal(read, rgb)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[: len(b) // 2], "does not match the SHA-256"),
        (lambda b: b"", "does not match the SHA-256"),
        (lambda b: os.urandom(len(b)), "does not match the SHA-256"),
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "does not match the SHA-256"),
        ("{}", "lacks image_shape, class_names or model_sha256"),
        ("not json", "is not JSON"),
    ],
)
def test_a_damaged_or_edited_export_is_one_line_before_it_is_loaded(
    trained, tmp_path, damage, message
):
    shutil.copytree(trained[0] / "export", tmp_path / "export")
    if isinstance(damage, str):
        (tmp_path / "export" / "classes.json").write_text(damage)
    else:
        model = tmp_path / "export" / "model.jax"
        model.write_bytes(damage(model.read_bytes()))
    np.save(tmp_path / "one.npy", trained[2][0, :, :, 0])
    result = run("predict", f"--workdir={tmp_path}", tmp_path / "one.npy")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_export_refuses_an_unknown_platform_before_writing(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    result = run("export", "--workdir", tmp_path / "run", "--platforms=cpu,bogus")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "--platforms: unknown bogus; choose from cpu, cuda, rocm, tpu" in result.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_predict_without_an_export_says_what_to_run(tmp_path):
    result = run("predict", "--workdir", tmp_path, tmp_path / "x.png")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "run python -m cnnflat_jax.export --workdir" in result.stderr


def test_a_population_exports_a_member_or_the_ensemble(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    config = idx_config(data, validation_examples=16)
    config.population.size = 2
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    record = lines[-1]  # The ensemble's, after one line per member.
    member_1 = next(r for r in lines if r["epoch"] == record["epoch"] and r["member"] == 1)
    images = idx.read_idx(data / "t10k-images-idx3-ubyte", ndim=3)[..., None]
    labels = idx.read_idx(data / "t10k-labels-idx1-ubyte", ndim=1)
    for flags, expected in (
        ([], record["best_member_test_accuracy"]),
        (["--member", "1"], member_1["test_accuracy"]),
        (["--ensemble"], record["test_accuracy"]),
    ):
        result = run("export", "--workdir", tmp_path / "run", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        logits = np.asarray(load_exported(tmp_path / "run").call(images))
        assert np.mean(logits.argmax(1) == labels) == pytest.approx(expected, abs=1e-6)
    for member in ("2", "-3"):
        result = run("export", "--workdir", tmp_path / "run", "--member", member)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"member {member} is out of range" in result.stderr
    result = run("export", "--workdir", tmp_path / "data")
    assert result.returncode == 1 and "not a train.py workdir" in result.stderr

    with pytest.raises(workdir_lib.RunError, match="holds a population of 2 models; choose"):
        trained_run.load_run(tmp_path / "run")
    whole = trained_run.load_run(tmp_path / "run", whole_population=True)
    one = trained_run.load_run(tmp_path / "run", 1)
    assert whole.team.size == 2 and one.team.is_population
    for stacked, alone in zip(jax.tree.leaves(whole.params), jax.tree.leaves(one.params)):
        assert stacked.shape[0] == 2
        np.testing.assert_array_equal(stacked[1], alone)
    logits = one.model.apply({"params": one.params}, images / 255.0)
    assert np.mean(np.argmax(logits, 1) == labels) == pytest.approx(member_1["test_accuracy"])


def test_load_run_gives_the_run_s_config_data_info_model_and_final_params(trained):
    workdir, _, images, labels = trained
    loaded = trained_run.load_run(workdir)
    config, data, model, params = loaded  # A tuple of the four, too.
    assert model is loaded.model and params is loaded.params and data is loaded.data
    assert loaded.config.to_dict() == json.loads((workdir / "config.json").read_text())
    assert loaded.data == json.loads((workdir / "data.json").read_text())
    assert loaded.data["image_shape"] == [8, 8, 1] and loaded.data["num_classes"] == 3
    assert not loaded.team.is_population and config is loaded.config
    logits = loaded.model.apply({"params": loaded.params}, images / 255.0)
    accuracy = np.mean(np.argmax(logits, 1) == labels)
    assert accuracy == pytest.approx(last_record(workdir)["test_accuracy"], abs=1e-6)
    with pytest.raises(workdir_lib.RunError, match="member 0 is out of range: .* holds one model"):
        trained_run.load_run(workdir, 0)


def test_every_file_of_a_finished_run_is_named_by_the_run_directory_module(trained):
    workdir = trained[0]
    named = set(workdir_lib.NAMES)
    assert set(os.listdir(workdir)) <= named
    assert {os.path.join("export", n) for n in os.listdir(workdir / "export")} <= named
    assert {"config.json", "metrics.jsonl", "final_params", "data.json", "export"} <= named


def test_a_workdir_that_is_not_a_finished_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(workdir_lib.RunError, match="has no config.json"):
        trained_run.load_run(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(workdir_lib.RunError, match="not a JSON object"):
        trained_run.load_run(tmp_path)


def test_predict_imports_neither_flax_nor_the_model_code():
    modules = ("flax", "cnnflat_jax.nn", "cnnflat_jax.models", "cnnflat_jax.ops")
    assert loaded_by("cnnflat_jax.predict", modules) == []


def test_final_params_with_their_data_deleted_are_one_error_line(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    for name in ("d", "ocdbt.process_0"):
        shutil.rmtree(workdir / "final_params" / name)
    result = run("export", "--workdir", workdir)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and f"{workdir / 'final_params'} cannot be read (" in errors[0]
    assert len(result.stderr.splitlines()) < 10, result.stderr[-3000:]  # Not 150.
