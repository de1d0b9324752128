"""What a run writes and shows: epoch records, metrics.jsonl and TensorBoard, the
config, log lines, a progress bar and a population's summary table."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from cnnflat_jax.run import tensorboard_log
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.train import population


class MetricsLog:
    """One JSON object per line in ``workdir/metrics.jsonl`` (nothing when not ``enabled``).

    ``lines`` are every line of the run's records so far; checkpoints keep a
    copy (``RunPosition.save``), so a resumed run rebuilds a deleted, torn or
    edited file from them, and a file deleted during the run is rebuilt at
    the next record. Given ``learning_rates`` (``train_lib.learning_rates``),
    epoch records and the final figures also go to TensorBoard
    (``tensorboard_log``).
    """

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        learning_rates: Callable[[int], Sequence[float]] | None = None,
    ):
        self.path = workdir_lib.path(workdir, workdir_lib.METRICS)
        self.enabled = enabled
        self.lines: list[str] = []
        self.events = None
        if enabled and learning_rates is not None:
            self.events = tensorboard_log.EventLog(workdir, learning_rates)

    def write(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record) + "\n")
        if not self.enabled:
            return
        if len(self.lines) > 1 and not workdir_lib.exists(self.path):
            logging.warning(
                "%s was deleted during the run; rebuilt it from the run's records", self.path
            )
            workdir_lib.replace_file(self.path, "".join(self.lines))
        else:
            workdir_lib.append(self.path, self.lines[-1])

    def restore(self, lines: list[str]) -> None:
        """Makes the file ``lines`` (a checkpoint's copy), warning of each line
        dropped (torn, garbage, or from past the checkpoint) and of records
        rebuilt (the file was deleted or cut)."""
        self.lines = list(lines)
        if not self.enabled:
            return
        try:
            present = _read_lines(self.path)
        except FileNotFoundError:
            present = []
        for number, line in enumerate(present, 1):
            if line not in self.lines:
                logging.warning(
                    "%s: dropped line %d, not a record of the checkpoint resumed from: %.60r",
                    self.path, number, line,
                )  # fmt: skip
        missing = [line for line in self.lines if line not in present]
        if missing:
            logging.warning("%s: rebuilt %d record(s) from the checkpoint", self.path, len(missing))
        if present != self.lines:
            workdir_lib.replace_file(self.path, "".join(self.lines))

    def write_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record; a population's as one line per member, then the rest."""
        for member_record in record.get("members", ()):
            self.write(member_record)
        self.write({k: v for k, v in record.items() if k != "members"})
        if self.events:
            self.events.write_epoch(record)

    def write_figures(self, workdir: str, epoch: int) -> None:
        """The run's figures, to TensorBoard (they are files already)."""
        if self.events:
            self.events.write_figures(workdir, epoch)

    def read(self) -> list[dict[str, Any]]:
        return [record for _, record in self._lines()]

    def truncate(self, last_epoch: int) -> None:
        """Keeps only the records of epochs up to ``last_epoch`` (atomically).

        The checkpoint says which epochs count, so a torn or garbage line (a
        crash mid-write, a stray edit) is dropped with a warning.
        """
        self.lines = []
        if not self.enabled or not workdir_lib.exists(self.path):
            return
        self.lines = [line for line, record in self._lines() if record["epoch"] <= last_epoch]
        workdir_lib.replace_file(self.path, "".join(self.lines))

    def _lines(self) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` for every line that holds an epoch's record."""
        result = []
        for number, line in enumerate(_read_lines(self.path), 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not is_record(record):
                logging.warning("%s: dropped line %d, not a record: %.60r", self.path, number, line)
                continue
            result.append((line.rstrip("\n") + "\n", record))
        return result


def _read_lines(path: str) -> list[str]:
    """The lines of ``path`` as a text file's iteration gives them."""
    return io.StringIO(workdir_lib.read_text(path), newline=None).readlines()


def is_record(record: Any) -> bool:
    """Whether ``record`` is an epoch's record as a run writes it: an object
    whose ``epoch`` is an int >= 1 and whose scores are numbers."""
    if not isinstance(record, dict):
        return False
    epoch = record.get("epoch")
    if type(epoch) is not int or epoch < 1:
        return False
    scores = ["test_loss", "test_accuracy"]
    if record.get("member") != "ensemble":
        scores += ["train_loss", "train_accuracy"]
    return all(type(record.get(name)) in (int, float) for name in scores)


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
    name ("test", "validation") to ``evaluation.evaluate``'s result.
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


def epoch_record(
    epoch: int,
    step: int,
    team: population.Population,
    totals: dict[str, np.ndarray],
    scores: dict[str, dict],
    timing: dict[str, float],
) -> dict[str, Any]:
    """An epoch's record: the model's, or a population's."""
    if team.is_population:
        return population_record(epoch, step, team.members, totals, scores, timing)
    return {"epoch": epoch, "step": step, **scores_record(totals, scores), **timing}


class Phases:
    """Seconds a run spends in each of its phases, summed over its epochs, in
    the order they first ran: ``with phases("eval"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed

    def line(self) -> str:
        """``data 0.21 s, build 0.55 s, ...``: the log line's form
        (``benchmarks/startup.py`` reads it)."""
        return ", ".join(f"{name} {sec:.2f} s" for name, sec in self.seconds.items())


def shown_record(record: dict[str, Any], team: population.Population) -> dict[str, Any]:
    """The record of the one model a run's figures show: a population's best
    member by validation, else its member 0."""
    if not team.is_population:
        return record
    return record["members"][record.get("best_member", 0)]


def log_data(data, num_train: int, num_validation: int, mesh, data_shards: int) -> None:
    """The run's data (an ``input_pipeline.Dataset``) and how it is split."""
    logging.info(
        "Data: %s from %s: %d train / %d validation / %d test images of %s, %d classes; "
        "%d device(s), %d data shard(s)",
        data.name, data.source, num_train, num_validation, data.test_total,
        "x".join(map(str, data.image_shape)), data.num_classes, mesh.size, data_shards,
    )  # fmt: skip


def log_model(name: str, params: Any, team: population.Population) -> None:
    """The model's parameter count, and a population's size and data order."""
    num_params = sum(x.size for x in jax.tree.leaves(params)) // team.size
    size = f", population of {team.size} ({team.mode} data order)" if team.is_population else ""
    logging.info("Model: %s, %d parameters%s", name, num_params, size)


def log_epoch(record: dict[str, Any], num_epochs: int) -> None:
    who = "ensemble " if record.get("member") == "ensemble" else ""
    train = "" if who else (
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
    )  # fmt: skip
    validation = (
        f" | validation acc {record['validation_accuracy']:.4f}"
        if "validation_accuracy" in record else ""
    )  # fmt: skip
    logging.info(
        "epoch %d/%d: %s%stest loss %.4f acc %.4f (%d images)%s | %.0f images/s",
        record["epoch"], num_epochs, train, who, record["test_loss"], record["test_accuracy"],
        record["test_count"], validation, record["images_per_sec"],
    )  # fmt: skip


def summary_table(member_list: Sequence[dict[str, Any]], scores: list[dict[str, float]]) -> str:
    """A plain-text table: one row per member with its settings and scores."""
    settings = ["seed", "learning_rate", "weight_decay", "momentum"]
    score_names = list(scores[0])
    header = ["member", *settings, *score_names]
    rows = [
        [str(k), *(f"{m[s]:g}" for s in settings), *(f"{row[n]:.4f}" for n in score_names)]
        for k, (m, row) in enumerate(zip(member_list, scores))
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join(lines)


def population_record(
    epoch: int,
    step: int,
    member_list: Sequence[dict[str, Any]],
    totals: dict[str, np.ndarray],
    scores: dict[str, dict],
    timing: dict[str, float],
) -> dict[str, Any]:
    """The ensemble's record for an epoch, with the members' under ``members``.

    With a validation split it names the best member by validation accuracy.
    """
    member_records = [
        {
            "epoch": epoch,
            "step": step,
            "member": k,
            **member_list[k],
            **scores_record(totals, scores, k),
        }
        for k in range(len(member_list))
    ]
    ensemble = scores["test"]["ensemble"]
    record = {
        "epoch": epoch,
        "step": step,
        "member": "ensemble",
        "test_loss": ensemble["loss"],
        "test_accuracy": ensemble["accuracy"],
        "test_count": ensemble["count"],
        "mean_member_test_accuracy": float(np.mean([r["test_accuracy"] for r in member_records])),
        **timing,
        "members": member_records,
    }
    if "validation" in scores:
        best = int(np.argmax([r["validation_accuracy"] for r in member_records]))
        record["best_member"] = best
        record["best_member_validation_accuracy"] = member_records[best]["validation_accuracy"]
        record["best_member_test_accuracy"] = member_records[best]["test_accuracy"]
    return record


def population_summary(member_list: Sequence[dict[str, Any]], record: dict[str, Any]) -> str:
    """The end-of-run table: each member's settings and accuracies, then the
    ensemble and the best member by validation."""
    columns = ["train_accuracy", "test_accuracy"]
    if "best_member" in record:
        columns.insert(1, "validation_accuracy")
    scores = [{c: r[c] for c in columns} for r in record["members"]]
    lines = [summary_table(member_list, scores)]
    lines.append(
        f"ensemble (averaged logits): test accuracy {record['test_accuracy']:.4f}; "
        f"mean member {record['mean_member_test_accuracy']:.4f}"
    )
    if "best_member" in record:
        lines.append(
            f"best member by validation: {record['best_member']} (validation "
            f"{record['best_member_validation_accuracy']:.4f}, test "
            f"{record['best_member_test_accuracy']:.4f})"
        )
    return "\n".join(lines)
