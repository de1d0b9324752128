"""Effective receptive fields (Luo et al., 2016) for docs/flatten.md.

How strongly each input pixel moves the unit at the centre of the last map before
the flatten or global pool (the gradient's magnitude, summed over that position's
channels and over the input's channels, averaged over test images and seeds),
beside the theoretical receptive field that ``layers.receptive_field`` counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cnnflat_jax.nn import layers, models
from cnnflat_jax.run import trained_run
from cnnflat_jax.train import train_lib

MODELS = ("CNN", "GAP CNN", "GAP CNN, deeper")
IMAGES = 1000  # The first test images.
COLLAPSING = ("flatten", "global_avg_pool")  # The layers that end the maps.


def last_map_position(specs) -> int:
    """The index of the layer whose output is the last map (the one before a collapse)."""
    kinds = [layer.kind for layer in layers.parse(specs)]
    return next(i for i, kind in enumerate(kinds) if kind in COLLAPSING) - 1


def field(workdir: str, images: np.ndarray) -> np.ndarray:
    """(H, W): mean over ``images`` of |d centre unit / d input pixel|, for one trained run."""
    run = trained_run.load_run(workdir)
    model, params = run.model, run.params
    position = last_map_position(models.layer_specs(model))

    def centre(x):
        _, state = model.apply({"params": params}, x, mutable=["intermediates"])
        maps = models.sown_layers(state["intermediates"])[position][1][0]
        return jnp.sum(maps[:, maps.shape[1] // 2, maps.shape[2] // 2, :])

    gradient = jax.jit(jax.grad(centre))(train_lib.normalize_images(images))
    return np.asarray(jnp.abs(gradient).sum(-1).mean(0))


def mass_side(grad_HW: np.ndarray, share: float = 0.9) -> int:
    """The side, in pixels, of the smallest square around the field's centre of mass that
    holds ``share`` of its total."""
    rows, cols = np.indices(grad_HW.shape)
    total = grad_HW.sum()
    cy, cx = np.sum(rows * grad_HW) / total, np.sum(cols * grad_HW) / total
    for side in range(1, 2 * max(grad_HW.shape) + 1):
        inside = (np.abs(rows - cy) <= side / 2) & (np.abs(cols - cx) <= side / 2)
        if grad_HW[inside].sum() >= share * total:
            return side
    return 2 * max(grad_HW.shape)


def figure(path: str, measured: dict[str, dict]) -> None:
    """One panel per model: its effective field (mean over seeds, normalised to its peak)
    with a box of its theoretical receptive field around the field's centre of mass."""
    fig = Figure(figsize=(4.2 * len(measured), 4.4))
    for i, (name, m) in enumerate(measured.items()):
        mean = np.mean(m["fields"], axis=0)
        mean /= mean.max()
        ax = fig.add_subplot(1, len(measured), i + 1)
        shown = ax.imshow(mean, cmap="magma", vmin=0, vmax=1)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        rows, cols = np.indices(mean.shape)
        cy, cx = (np.sum(rows * mean) / mean.sum(), np.sum(cols * mean) / mean.sum())
        size = m["theoretical"]
        ax.add_patch(Rectangle((cx - size / 2, cy - size / 2), size, size, fill=False,
                               edgecolor="cyan", lw=1.2, ls="--"))  # fmt: skip
        ax.set_title(f"{name}\ntheoretical field {size} px (dashed); 90% of the gradient "
                     f"within {np.mean(m['side_90']):.1f} px", fontsize=8)  # fmt: skip
        ax.set_xlabel("input column (of 28)", fontsize=8)
        ax.set_ylabel("input row (of 28)", fontsize=8)
    n = min(len(m["fields"]) for m in measured.values())
    fig.suptitle(
        "Effective receptive field of the last map's centre unit: mean |input gradient| over "
        f"{IMAGES:,} test images and {n} seeds, normalised to its peak",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
