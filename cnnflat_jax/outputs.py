"""What a finished run leaves in its workdir besides metrics: parameters and figures."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from cnnflat_jax import (
    batching,
    checkpoints,
    hardest,
    input_pipeline,
    plots,
    population,
    reporting,
    train_lib,
)


def write(
    config: ml_collections.ConfigDict,
    workdir: str,
    state: train_lib.TrainState,
    record: dict[str, Any],
    data: input_pipeline.Dataset,
    train: batching.TrainData,
    metrics_log: reporting.MetricsLog,
    lead: bool,
) -> None:
    """Writes ``final_params/`` (every process takes part), then, from the
    ``lead`` process, the figures of one model: a population's best member by
    validation, else its member 0. Logs a population's summary table."""
    checkpoints.save_params(os.path.join(workdir, "final_params"), state.params)
    is_population = "members" in record
    shown = population.member_state(state, record.get("best_member", 0)) if is_population else state
    if lead:
        if is_population:
            summary = reporting.population_summary(population.members(config), record)
            logging.info("Population summary:\n%s", summary)
        predicted = train_lib.predict(shown.apply_fn, shown.params, data.test_images)
        confusion = np.asarray(reporting.shown_record(record)["test_confusion"])
        plots.write_run_figures(
            workdir, metrics_log.read(), confusion, data.test_images, data.test_labels, predicted
        )
    if config.per_example.report_hardest:
        hardest.report(
            shown, train.images, train.labels, workdir,
            num_shown=config.per_example.report_hardest,
            num_scanned=config.per_example.report_scan_examples,
        )  # fmt: skip
