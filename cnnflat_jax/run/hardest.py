"""The hardest training examples: largest per-example gradient norms and losses."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax

from cnnflat_jax.data import batching
from cnnflat_jax.run import plots
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.train import per_example, train_lib


@jax.jit
def example_scores(
    state: train_lib.TrainState, images: jax.Array, labels: jax.Array
) -> dict[str, jax.Array]:
    """Per-example gradient norm, loss and prediction for one batch."""

    def loss(params, example):
        return train_lib.example_loss(params, state.apply_fn, example)

    grads = per_example.per_example_grads(loss, state.params, {"image": images, "label": labels})
    logits = state.apply_fn({"params": state.params}, train_lib.normalize_images(images))
    return {
        "grad_norm": per_example.global_norms(grads),
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        "predicted": logits.argmax(axis=-1),
    }


def report(
    state: train_lib.TrainState,
    examples: batching.Examples,
    workdir: str,
    *,
    num_shown: int,
    num_scanned: int,
    batch_size: int = 128,
) -> list[dict]:
    """Scores the first ``num_scanned`` examples; writes the top ``num_shown``.

    Writes ``hardest_examples.png`` (an image grid titled "label>prediction",
    loss and gradient norm) and ``hardest_examples.json``, ordered by gradient
    norm, largest first. Returns the JSON rows.
    """
    n = min(num_scanned, len(examples))
    images, labels = examples.read(slice(n))
    padded_images, padded_labels, _ = batching.eval_arrays(images, labels, batch_size)
    batches = [example_scores(state, x, y) for x, y in zip(padded_images, padded_labels)]
    scores = {k: np.concatenate([np.asarray(b[k]) for b in batches])[:n] for k in batches[0]}
    top = np.argsort(-scores["grad_norm"], kind="stable")[:num_shown]
    rows = [
        {
            "index": int(i),
            "label": int(labels[i]),
            "predicted": int(scores["predicted"][i]),
            "loss": float(scores["loss"][i]),
            "grad_norm": float(scores["grad_norm"][i]),
        }
        for i in top
    ]
    workdir_lib.replace_file(
        workdir_lib.path(workdir, workdir_lib.HARDEST_LIST), json.dumps(rows, indent=1)
    )
    titles = [
        f"#{r['index']} {r['label']}>{r['predicted']}\n"
        f"loss {r['loss']:.2f} |g| {r['grad_norm']:.1f}"
        for r in rows
    ]
    plots.save_image_grid(
        workdir_lib.path(workdir, workdir_lib.HARDEST_FIGURE), images[top], titles
    )
    return rows
