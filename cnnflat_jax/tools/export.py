"""A trained model as a ``jax.export`` artifact: ``W/export/model.jax``.

    python -m cnnflat_jax.export --workdir runs/default
    python -m cnnflat_jax.export --workdir runs/population --ensemble

The artifact is the serialized inference function of a finished
``train.py`` run, its weights inside: uint8 NHWC images with a symbolic
batch dimension in, logits out (pixels are scaled to [0, 1] inside, as in
training). ``W/export/classes.json`` beside it holds the class names and the
image shape. Serving it needs jax and these two files, neither the config
nor this package's model code::

    exported = jax.export.deserialize(bytearray(open("model.jax", "rb").read()))
    logits = exported.call(images_uint8_NHWC)

A population exports its best member by validation accuracy (member 0 when
the run had no validation split), another member with ``--member``, or the
ensemble (the members' averaged logits, as the run scores it) with
``--ensemble``. The artifact is lowered for this machine's platform (CPU
here); ``--platforms=cpu,cuda,tpu`` lowers it for several.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from cnnflat_jax.nn import models
from cnnflat_jax.run import checkpoints, outputs
from cnnflat_jax.train import train_lib

__all__ = [
    "EXPORT_DIR",
    "MODEL_FILE",
    "CLASSES_FILE",
    "inference_function",
    "export",
    "main",
]

EXPORT_DIR = "export"
MODEL_FILE = "model.jax"
CLASSES_FILE = "classes.json"


def _run_info(workdir: str) -> tuple[dict, dict, list[dict]]:
    """``config.json``, ``data.json`` and ``metrics.jsonl`` of a finished run."""
    config = checkpoints.read_config(workdir)
    paths = [os.path.join(workdir, name) for name in (outputs.DATA_INFO, "metrics.jsonl")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {workdir!r} is not a finished run")
    with open(paths[0]) as f:
        data = json.load(f)
    with open(paths[1]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return config, data, records


def inference_function(workdir: str, member: int | None = None, ensemble: bool = False):
    """``(images_uint8_NHWC -> logits, what)`` for a finished run's final parameters."""
    config, data, records = _run_info(workdir)
    shape, num_classes = tuple(data["image_shape"]), data["num_classes"]
    size = config["population"]["size"]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()}
    model = models.from_fields(fields, num_classes)
    if size == 1 and (member or ensemble):
        raise ValueError(f"{workdir!r} holds one model; --member and --ensemble need a population")
    if ensemble:
        x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
        like = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct((size, *a.shape), a.dtype), like)
        stacked = checkpoints.load_params(os.path.join(workdir, "final_params"), like)

        def logits(images):
            members = jax.vmap(lambda p: model.apply({"params": p}, images))(stacked)
            return jnp.mean(members, axis=0)

        return _scaled(logits), f"the ensemble of {size} members"
    if size > 1 and member is None:
        member = records[-1].get("best_member", 0)
    _, params = checkpoints.load_trained(
        workdir, input_hwc=shape, num_classes=num_classes, member=member
    )
    what = "the model" if size == 1 else f"member {member} of {size}"
    return _scaled(lambda images: model.apply({"params": params}, images)), what


def _scaled(logits_of):
    def infer(images_NHWC):
        return logits_of(train_lib.normalize_images(images_NHWC))

    return infer


def export(
    workdir: str,
    member: int | None = None,
    ensemble: bool = False,
    platforms: tuple[str, ...] | None = None,
) -> str:
    """Writes ``workdir/export/model.jax`` and ``classes.json``; returns the model's path."""
    _, data, _ = _run_info(workdir)
    infer, what = inference_function(workdir, member, ensemble)
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *data["image_shape"]), jnp.uint8)
    exported = jax.export.export(jax.jit(infer), platforms=platforms)(images)
    directory = os.path.join(workdir, EXPORT_DIR)
    os.makedirs(directory, exist_ok=True)
    classes = {
        "class_names": data["class_names"],
        "image_shape": data["image_shape"],
        "dataset": data["dataset"],
        "exported": what,
    }
    for name, content in (
        (MODEL_FILE, bytes(exported.serialize())),
        (CLASSES_FILE, json.dumps(classes, indent=2).encode()),
    ):
        path = os.path.join(directory, name)
        with open(path + ".tmp", "wb") as f:  # Whole or not at all.
            f.write(content)
        os.replace(path + ".tmp", path)
    return os.path.join(directory, MODEL_FILE)


def main() -> None:
    """The command line (flags are defined here, so importing the module defines none)."""
    workdir = flags.DEFINE_string("workdir", None, "A finished train.py run.")
    member = flags.DEFINE_integer("member", None, "A population: export this member.")
    ensemble = flags.DEFINE_boolean("ensemble", False, "A population: export the ensemble.")
    platforms = flags.DEFINE_list("platforms", None, "Lower for these (default: this machine's).")

    def run(argv):
        if len(argv) > 1 or not workdir.value:
            sys.exit("usage: python -m cnnflat_jax.export --workdir W [--member K | --ensemble]")
        try:
            path = export(workdir.value, member.value, ensemble.value, platforms.value)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
        print(f"wrote {path}")

    app.run(run)
