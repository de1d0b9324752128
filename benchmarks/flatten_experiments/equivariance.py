"""Equivariance you can see: test images and their shifts of 1-8 px (the figure: 1-4)
through conv, pool, flatten and global average pooling (GAP), for docs/flatten.md.

``measure`` runs on each trained seed of the "CNN" and "GAP CNN" variants of
``flatten_experiments`` (per shift: how similar each vector stays to the unshifted
image's); ``write`` gathers the seeds into ``equivariance.md`` and draws
``equivariance.png`` (one test image, row by row, seed 0 of each).
"""

from __future__ import annotations

import os
import time

import numpy as np
from matplotlib.figure import Figure

from benchmarks.flatten_experiments import stats
from cnnflat_jax.data import input_pipeline, transforms
from cnnflat_jax.nn import models
from cnnflat_jax.run import trained_run
from cnnflat_jax.tools import explain
from cnnflat_jax.train import train_lib

SHIFTS = tuple(range(9))  # Pixels to the right, in the table; the CNN's total stride is 4.
DRAWN = (0, 1, 2, 3, 4)  # The figure's rows.
INDEX = 0  # The test image drawn.
# The chance baselines: each image against another test image of its class, or another's.
BASELINES = {"another image, same class": True, "another image, other class": False}
ROWS = (*(f"{s} px" for s in SHIFTS), *BASELINES)  # The table's, in order.


def trained(workdir: str):
    """A trained run as ``images -> {stage: array}``."""
    run = trained_run.load_run(workdir)
    model, params = run.model, run.params

    def stages(images: np.ndarray) -> dict[str, np.ndarray]:
        _, state = model.apply(
            {"params": params}, train_lib.normalize_images(images), mutable=["intermediates"]
        )
        out, pools = {}, 0
        for kind, value in models.sown_layers(state["intermediates"]):
            value = np.asarray(value[0])
            if kind == "relu" and "conv1" not in out:
                out["conv1"] = value
            elif kind.endswith("_pool") and kind != "global_avg_pool":
                pools += 1
                out[f"pool{pools}"] = value
            elif kind in ("flatten", "global_avg_pool"):
                out[kind] = value
                break
        return out

    return stages


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row; 1 for two all-zero rows."""
    dot = np.sum(a * b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)


def one_cell_right(maps: np.ndarray) -> np.ndarray:
    """7x7 maps moved one cell right, zero fill: where a 4 px shift should put them."""
    moved = np.zeros_like(maps)
    moved[:, :, 1:] = maps[:, :, :-1]
    return moved


def still_active(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per row: the share of ``base``'s active positions (> 0) that are active in
    ``other`` too. The one definition the table and the figure use."""
    active = base > 0
    return np.sum(active & (other > 0), axis=1) / np.maximum(active.sum(1), 1)


def cnn_similarities(cnn, first, second) -> dict[str, np.ndarray]:
    """Per image pair (row i of ``first`` and of ``second``): how alike the CNN's
    flattened vectors, and the GAP of its own last maps, are."""
    a, b = cnn(first), cnn(second)
    return {
        "flatten": cosine(a["flatten"], b["flatten"]),
        "still_active": still_active(a["flatten"], b["flatten"]),
        "cnn_gap": cosine(a["pool2"].mean((1, 2)), b["pool2"].mean((1, 2))),
    }


def gap_similarities(gap_cnn, first, second, gap_mean) -> dict[str, np.ndarray]:
    """Per image pair: how alike the GAP CNN's vectors are, plainly and centred on
    ``gap_mean`` (its mean vector over the test images)."""
    gap_a, gap_b = gap_cnn(first)["global_avg_pool"], gap_cnn(second)["global_avg_pool"]
    return {"gap": cosine(gap_a, gap_b), "gap_centred": cosine(gap_a - gap_mean, gap_b - gap_mean)}


def partners(labels: np.ndarray, same_class: bool, seed: int = 0) -> np.ndarray:
    """For each image, another image's index: of the same class, or of another."""
    rng = np.random.default_rng(seed)
    chosen = np.empty(len(labels), np.int64)
    for i, label in enumerate(labels):
        pool = np.flatnonzero((labels == label) if same_class else (labels != label))
        pool = pool[pool != i]
        chosen[i] = pool[rng.integers(len(pool))]
    return chosen


def measure(workdir: str, images, labels, batch: int = 1000) -> dict[str, dict[str, float]]:
    """The trained run in ``workdir`` (a CNN, or a GAP CNN): means over ``images`` of its
    similarities per shift of each image, and the chance baselines (an image against
    another test image of its class, and of another class)."""
    stages = trained(workdir)
    gap = "global_avg_pool" in stages(images[:1])
    pairs = {f"{s} px": lambda x, i, s=s: transforms.shift(x, 0, s) for s in SHIFTS}
    for name, same in BASELINES.items():
        partner = partners(labels, same)
        pairs[name] = lambda x, i, p=partner: images[p[i]]
    if gap:
        gap_sum = sum(
            stages(images[start : start + batch])["global_avg_pool"].sum(0)
            for start in range(0, len(images), batch)
        )
        gap_mean = gap_sum / len(images)
    rows = {}
    for name, second in pairs.items():
        sums = {}
        for start in range(0, len(images), batch):
            i = np.arange(start, min(start + batch, len(images)))
            first, other = images[i], second(images[i], i)
            if gap:
                values = gap_similarities(stages, first, other, gap_mean)
            else:
                values = cnn_similarities(stages, first, other)
            if not gap and name == "4 px":
                expected = one_cell_right(stages(first)["pool2"])
                moved = stages(other)["pool2"]
                values["one_cell"] = cosine(expected.reshape(len(i), -1), moved.reshape(len(i), -1))
                # Without the first and last columns, where content enters and leaves.
                values["one_cell_inside"] = cosine(
                    expected[:, :, 1:-1].reshape(len(i), -1), moved[:, :, 1:-1].reshape(len(i), -1)
                )
            for key, v in values.items():
                sums[key] = sums.get(key, 0.0) + float(np.sum(v))
        rows[name] = {key: total / len(images) for key, total in sums.items()}
    return rows


def figure(path: str, cnn, gap_cnn, image: np.ndarray, title: str) -> None:
    """Rows: the image shifted by 0-4 px. Columns: the image, a conv1 map, a pool2
    map, the flattened vector's active positions, the GAP vector."""
    shifted = np.concatenate([transforms.shift(image[None], 0, s) for s in DRAWN])
    stages, gap_vectors = cnn(shifted), gap_cnn(shifted)["global_avg_pool"]
    c1 = int(np.argmax(stages["conv1"][0].mean((0, 1))))
    c2 = int(np.argmax(stages["pool2"][0].mean((0, 1))))
    flat = stages["flatten"]
    maps_hwc = stages["pool2"].shape[1:]
    fig = Figure(figsize=(16, 2.3 * len(DRAWN) + 1.0))
    grid = fig.add_gridspec(len(DRAWN), 5, width_ratios=[1, 1, 1, 4.5, 2.2])
    tops = {"conv1": stages["conv1"][..., c1].max(), "pool2": stages["pool2"][..., c2].max()}
    for row, s in enumerate(DRAWN):
        panels = [
            (f"input, {s} px right", shifted[row, ..., 0], "gray", 255),
            (f"conv1 + ReLU, channel {c1}", stages["conv1"][row, ..., c1], "viridis",
             tops["conv1"]),
            (f"pool2 (7x7), channel {c2}", stages["pool2"][row, ..., c2], "viridis",
             tops["pool2"]),
        ]  # fmt: skip
        for col, (name, array, cmap, top) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            shown = ax.imshow(array, cmap=cmap, vmin=0, vmax=top)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = fig.add_subplot(grid[row, 3])
        # Channel c2's 49 entries of the flattened vector, at their positions in it.
        cells = [explain.flat_position(maps_hwc, h, w, c2) for h, w in np.ndindex(maps_hwc[:2])]
        ax.bar(cells, flat[row][cells], width=30, color="C0", label=f"shifted {s} px")
        ax.bar(cells, flat[0][cells], width=30, fill=False, edgecolor="gray", label="unshifted")
        for h in range(maps_hwc[0]):  # Row h of the map starts a block of W * C positions.
            ax.axvline(explain.flat_position(maps_hwc, h, 0, 0), color="gray", lw=0.6, ls=":")
        overlap = 100 * still_active(flat[:1], flat[row : row + 1])[0]
        ax.set_xlim(0, flat.shape[1])
        ax.set_title(
            f"flattened vector, channel {c2}'s {len(cells)} positions\n(all channels: "
            f"{np.sum(flat[row] > 0)} of {flat.shape[1]} active; {overlap:.0f}% of the "
            "unshifted vector's active positions still active)",
            fontsize=8,
        )  # fmt: skip
        ax.set_xlabel("position in the vector (dotted: where map row h = 0..6 starts)", fontsize=7)
        ax.set_ylabel("value after ReLU + pool", fontsize=7)
        if row == 0:
            ax.legend(fontsize=7)
        ax = fig.add_subplot(grid[row, 4])
        channels = np.arange(gap_vectors.shape[1])
        ax.bar(channels, gap_vectors[row], width=1.0, color="C1")
        ax.bar(channels, gap_vectors[0], width=1.0, fill=False, edgecolor="gray", lw=0.5)
        ax.set_ylim(0, gap_vectors.max() * 1.05)
        similarity = cosine(gap_vectors[:1], gap_vectors[row : row + 1])[0]
        ax.set_title(f"GAP CNN's 64-vector\ncosine to unshifted {similarity:.3f}", fontsize=8)
        ax.set_xticks(np.arange(0, len(channels) + 1, 16))
        ax.set_xlabel("channel", fontsize=7)
        ax.set_ylabel("channel mean", fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def spread(values, scale: float = 1.0, digits: int = 3) -> str:
    """The mean over seeds, with its 95% interval when there are several."""
    values = scale * np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    interval = stats.mean_interval(values)
    return f"{interval.estimate:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def write(out: str, data: input_pipeline.Dataset, measured: dict, drawn: tuple, reproduce) -> None:
    """``equivariance.md`` and ``equivariance.png`` in ``out``. ``measured``: per variant
    ("CNN", "GAP CNN"), each seed's ``measure`` and the seconds they took; ``drawn``: the
    runs of the CNN and the GAP CNN the figure draws; ``reproduce(seconds)``: the note's
    last line."""
    start = time.perf_counter()
    seeds = {name: m["seeds"] for name, m in measured.items()}
    rows = {
        pair: {key: [seed[pair][key] for seed in per_seed] for per_seed in seeds.values()
               for key in per_seed[0][pair]}
        for pair in ROWS
    }  # fmt: skip
    lines = [
        "# Equivariance: shifted test images through flatten and GAP",
        "",
        "| the image against | flatten: cosine | flatten: active positions still active, % "
        "| GAP of the CNN's own maps: cosine | GAP CNN: cosine | GAP CNN: centred cosine |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        against = f"itself shifted {name} right" if name.endswith("px") else name
        lines.append(
            f"| {against} | {spread(r['flatten'])} | {spread(r['still_active'], 100, 1)} "
            f"| {spread(r['cnn_gap'])} | {spread(r['gap'])} | {spread(r['gap_centred'])} |"
        )
    label = input_pipeline.class_names("fashion_mnist", 10)[int(data.test_labels[INDEX])]
    figure(
        os.path.join(out, "equivariance.png"), trained(drawn[0]), trained(drawn[1]),
        data.test_images[INDEX],
        f"Test image {INDEX} ({label}) shifted right: the maps move with it, the flattened "
        "vector's active positions move to other indices, the GAP vector stays put\n(seed 0 "
        "of each model, one image: no error bars)",
    )  # fmt: skip
    seconds = time.perf_counter() - start + sum(m["sec"] for m in measured.values())
    note = (
        f"Means over all {len(data.test_images):,} test images, then over the seeds (the "
        f"CNN's first {len(seeds['CNN'])}, the GAP CNN's first {len(seeds['GAP CNN'])}) with "
        "the 95% interval over the seeds. "
        "Cosine: between the two images' vectors (1 = same direction). Centred "
        "cosine: the same after subtracting the GAP CNN's mean vector over the test images "
        "(its non-negative vectors all point roughly the same way, so their plain cosine is "
        "high for any two images). Still "
        "active: the share of the first image's active positions (> 0 after the ReLU and "
        "pools) that are active for the second too. The last two rows are the chance "
        "baselines: each test image against another test image (a fixed random pick) of its "
        "class, and of another class. A 4 px shift moves the CNN's 7x7x64 pool2 maps by one "
        "cell: they match the unshifted maps moved one cell right with cosine "
        f"{spread(rows['4 px']['one_cell'])}, and {spread(rows['4 px']['one_cell_inside'])} "
        "without the first and last columns of cells (where content enters and leaves the "
        f"map). {reproduce(seconds)}"
    )
    text = "\n".join(lines) + f"\n\n{note}\n"
    with open(os.path.join(out, "equivariance.md"), "w") as f:
        f.write(text)
    print(f"\n## equivariance\n\n{text}")
