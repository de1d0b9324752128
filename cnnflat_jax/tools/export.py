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

import hashlib

import jax
import jax.numpy as jnp
from absl import app, flags

from cnnflat_jax import errors
from cnnflat_jax.run import reporting, trained_run
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.tools import command
from cnnflat_jax.train import train_lib

__all__ = ["ExportError", "PLATFORMS", "inference_function", "export", "main"]

# The platforms jax.export lowers for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(errors.Error, ValueError):
    """An export that cannot be made as asked."""


def inference_function(workdir: str, member: int | None = None, ensemble: bool = False):
    """``(images_uint8_NHWC -> logits, what)`` for a finished run's final parameters."""
    if ensemble and member is not None:
        raise workdir_lib.RunError("choose --member or --ensemble, not both")
    run = trained_run.load_run(workdir, member, whole_population=True)
    model = run.model
    if not run.team.is_population:
        if ensemble:
            raise workdir_lib.RunError(f"{workdir!r} holds one model; --ensemble needs members")
        return _scaled(lambda images: model.apply({"params": run.params}, images)), "the model"
    if ensemble:

        def logits(images):
            members = jax.vmap(lambda p: model.apply({"params": p}, images))(run.params)
            return jnp.mean(members, axis=0)

        return _scaled(logits), f"the ensemble of {run.team.size} members"
    params = run.params
    if member is None:  # The member the run's figures show.
        records = reporting.MetricsLog(workdir).read()
        member = records[-1].get("best_member", 0) if records else 0
        params = jax.tree.map(lambda a: a[member], params)
    what = f"member {member} of {run.team.size}"
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
    """Writes ``workdir/export/model.jax`` and ``classes.json``; returns the model's path.

    ``classes.json`` holds ``model.jax``'s SHA-256, which ``predict`` checks.

    Raises:
      ExportError: an unknown platform.
      workdir.RunError: not a finished run; a member out of range.
    """
    unknown = sorted(set(platforms or ()) - set(PLATFORMS))
    if unknown:
        raise ExportError(
            f"--platforms: unknown {', '.join(unknown)}; choose from {', '.join(PLATFORMS)}"
        )
    data = workdir_lib.read_data_info(workdir)
    infer, what = inference_function(workdir, member, ensemble)
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *data["image_shape"]), jnp.uint8)
    exported = jax.export.export(jax.jit(infer), platforms=platforms)(images)
    workdir_lib.own_directory(workdir_lib.path(workdir, workdir_lib.EXPORT))
    serialized = bytes(exported.serialize())
    classes = {
        "class_names": data["class_names"],
        "image_shape": data["image_shape"],
        "dataset": data["dataset"],
        # predict resizes pictures as a folder dataset's training pictures were.
        "resize_pictures": bool(data.get("resize_pictures", False)),
        "exported": what,
        "model_sha256": hashlib.sha256(serialized).hexdigest(),  # predict checks it.
    }
    model_path = workdir_lib.path(workdir, workdir_lib.EXPORT_MODEL)
    workdir_lib.replace_file(model_path, serialized)
    workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.EXPORT_CLASSES), classes)
    return model_path


def main() -> None:
    """The command line (flags are defined here, so importing the module defines none)."""
    workdir = flags.DEFINE_string("workdir", None, "A finished train.py run.")
    member = flags.DEFINE_integer("member", None, "A population: export this member.")
    ensemble = flags.DEFINE_boolean("ensemble", False, "A population: export the ensemble.")
    platforms = flags.DEFINE_list("platforms", None, "Lower for these (default: this machine's).")

    def run(argv):
        if len(argv) > 1 or not workdir.value:
            command.usage("python -m cnnflat_jax.export --workdir W [--member K | --ensemble]")
        with command.one_line_failures():
            path = export(workdir.value, member.value, ensemble.value, platforms.value)
        print(f"wrote {path}")

    app.run(run)
