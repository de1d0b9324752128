"""What a finished run leaves in its workdir besides metrics: parameters and figures."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from cnnflat_jax.data import batching, input_pipeline
from cnnflat_jax.run import checkpoints, hardest, plots, reporting
from cnnflat_jax.run import workdir as workdir_lib
from cnnflat_jax.train import evaluation, population, train_lib


def write(
    config: ml_collections.ConfigDict,
    team: population.Population,
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
    final_params = workdir_lib.not_a_link(workdir_lib.path(workdir, workdir_lib.FINAL_PARAMS))
    checkpoints.save_params(final_params, state.params)
    if lead:
        workdir_lib.write_data_info(
            workdir, data.name, data.image_shape, data.num_classes, data.class_names,
            resize_pictures=bool(data.folder_classes),
        )  # fmt: skip
    shown = state
    if team.is_population:
        shown = population.member_state(state, record.get("best_member", 0))
    if lead:
        if team.is_population:
            summary = reporting.population_summary(team.members, record)
            logging.info("Population summary:\n%s", summary)
        predicted = evaluation.predict(shown.apply_fn, shown.params, data.test_images)
        confusion = np.asarray(reporting.shown_record(record, team)["test_confusion"])
        plots.write_run_figures(
            workdir, metrics_log.read(), confusion, data.test_images, data.test_labels, predicted
        )
        metrics_log.write_figures(workdir, record["epoch"])
    if config.per_example.report_hardest:
        hardest.report(
            shown, train.examples, workdir,
            num_shown=config.per_example.report_hardest,
            num_scanned=config.per_example.report_scan_examples,
        )  # fmt: skip
