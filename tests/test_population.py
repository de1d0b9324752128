"""Populations: K models in one vmapped program, checked against single runs."""

import json

import jax
import numpy as np
import pytest
from helpers import final_params, idx_config, write_idx_dataset

from cnnflat_jax import config as config_lib
from cnnflat_jax.configs import smoke
from cnnflat_jax.data import batching
from cnnflat_jax.nn import models
from cnnflat_jax.run import trainer
from cnnflat_jax.train import evaluation, population, train_lib


def tiny_config(data_dir, **population_fields):
    config = idx_config(data_dir, optimizer="sgd")
    config.population.update(population_fields)
    return config


def assert_trees_close(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) == 8
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("independent", [True, False])
def test_member_k_trains_like_a_single_run_with_its_seed_and_hparams(tmp_path, independent):
    data = write_idx_dataset(tmp_path / "data", num_train=80)
    seeds, rates, momenta = (3, 5, 0), (0.05, 0.1, 0.2), (0.0, 0.9, 0.5)
    config = tiny_config(
        data, size=3, seeds=seeds, learning_rates=rates, momenta=momenta,
        independent_data_order=independent,
    )  # fmt: skip
    config.seed = 0  # The shared data order is the seed-0 run's.
    trainer.train_and_evaluate(config, str(tmp_path / "population"))
    stacked = final_params(tmp_path / "population", members=3)
    # With a shared order only the seed-0 member sees a single run's order.
    checked = range(3) if independent else [2]
    for k in checked:
        single = tiny_config(data)
        single.seed, single.learning_rate, single.momentum = seeds[k], rates[k], momenta[k]
        trainer.train_and_evaluate(single, str(tmp_path / f"single{k}"))
        member = jax.tree.map(lambda x, k=k: x[k], stacked)
        assert_trees_close(member, final_params(tmp_path / f"single{k}"))


def test_metrics_have_a_line_per_member_and_the_ensemble(tmp_path):
    data = write_idx_dataset(tmp_path / "data", num_train=80)
    config = tiny_config(data, size=2, learning_rates=(0.01, 0.2))
    config.validation_examples = 16
    result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["member"]) for r in lines] == [
        (1, 0), (1, 1), (1, "ensemble"), (2, 0), (2, 1), (2, "ensemble"),
    ]  # fmt: skip
    members = lines[3:5]
    assert [m["learning_rate"] for m in members] == [0.01, 0.2]
    assert [m["seed"] for m in members] == [0, 1]
    assert all(m["validation_count"] == 16 and m["test_count"] == 37 for m in members)
    best = int(np.argmax([m["validation_accuracy"] for m in members]))
    assert result["best_member"] == best
    assert result["best_member_test_accuracy"] == members[best]["test_accuracy"]
    assert result["step"] == 2 * 4  # 64 training images / 16.


def test_ensemble_scores_the_averaged_logits(tmp_path):
    config = smoke.get_config()
    config.population.update(size=3, learning_rates=(0.1, 0.2, 0.3))
    model = models.CNN(num_classes=3, conv_features=(4,), dense_features=(8,))
    make_tx = train_lib.optimizer_factory(config, 10)
    members = population.of_config(config).members
    state = population.create_population(model, (8, 8, 1), make_tx, members)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (45, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 45).astype(np.int32)
    arrays = batching.eval_arrays(images, labels, 20)
    result = evaluation.evaluate(state, arrays, population=True)
    members = [population.member_state(state, k) for k in range(3)]
    logits = np.stack([model.apply({"params": m.params}, images / 255.0) for m in members])
    for k in range(3):
        expected = (logits[k].argmax(axis=1) == labels).mean()
        assert result["members"][k]["accuracy"] == pytest.approx(expected)
    assert result["ensemble"]["accuracy"] == pytest.approx(
        (logits.mean(axis=0).argmax(axis=1) == labels).mean()
    )
    assert result["ensemble"]["count"] == 45


def test_member_lists_must_match_the_size():
    config = smoke.get_config()
    config.population.update(size=3, learning_rates=(0.1, 0.2))
    message = r"config.population.learning_rates=\(0.1,0.2\): 2 values for population.size=3"
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.check(config)


def test_members_default_to_consecutive_seeds_and_config_values():
    config = smoke.get_config()
    config.seed = 10
    config.population.update(size=2, momenta=(0.5, 0.99))
    team = population.of_config(config)
    assert team.is_population and team.mode == "shared" and team.size == 2
    members = team.members
    assert [m["seed"] for m in members] == [10, 11]
    assert [m["momentum"] for m in members] == [0.5, 0.99]
    assert [m["learning_rate"] for m in members] == [config.learning_rate] * 2


def test_one_model_is_no_population_and_independent_orders_have_their_own_mode():
    config = smoke.get_config()
    single = population.of_config(config)
    assert not single.is_population and single.mode == "single" and single.size == 1
    config.population.update(size=3, independent_data_order=True)
    assert population.of_config(config).mode == "independent"
