"""What a run writes and shows: metrics.jsonl, the config, a progress bar."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ml_collections
import numpy as np
import tqdm


class MetricsLog:
    """One JSON object per line in ``workdir/metrics.jsonl`` (nothing when not ``enabled``)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record; a population's as one line per member, then the rest."""
        for member_record in record.get("members", ()):
            self.write(member_record)
        self.write({k: v for k, v in record.items() if k != "members"})

    def read(self) -> list[dict[str, Any]]:
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def truncate(self, last_epoch: int) -> None:
        """Keeps only the records of epochs up to ``last_epoch`` (atomically)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if json.loads(line)["epoch"] <= last_epoch]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config as ``config.json`` (atomically)."""
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)


def progress_bar(total_steps: int, epoch: int, num_epochs: int, enabled: bool) -> tqdm.tqdm:
    """A bar over one epoch's steps; ``set_postfix`` adds loss and images/s."""
    return tqdm.tqdm(
        total=total_steps,
        desc=f"epoch {epoch}/{num_epochs}",
        unit="step",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )


def scores_record(
    totals: dict[str, np.ndarray], scores: dict[str, dict], k: int | None = None
) -> dict[str, Any]:
    """An epoch's metrics for the model, or for member ``k`` of a population.

    ``totals`` are the epoch's training metric sums; ``scores`` maps a split
    name ("test", "validation") to ``train_lib.evaluate``'s result.
    """

    def pick(value):
        return value if k is None else value[k]

    def member(result):
        return result if k is None else result["members"][k]

    record = {
        "train_loss": float(pick(totals["loss_sum"]) / pick(totals["count"])),
        "train_accuracy": float(pick(totals["correct"]) / pick(totals["count"])),
    }
    for name, result in scores.items():
        result = member(result)
        record[f"{name}_loss"] = result["loss"]
        record[f"{name}_accuracy"] = result["accuracy"]
        record[f"{name}_count"] = result["count"]
    test = member(scores["test"])
    record["test_per_class_accuracy"] = test["per_class_accuracy"]
    record["test_confusion"] = test["confusion"]
    return record
