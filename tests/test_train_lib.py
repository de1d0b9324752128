"""Training steps, epoch plans, the compiled loop, evaluation, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import idx_config, write_idx_dataset

from cnnflat_jax import checkpoints, models, train_lib, trainer
from configs import cifar10, default, fast, mnist, smoke, tpu
from configs import population as population_config


def small_state(optimizer="adam", num_classes=3, seed=0, shape=(8, 8, 1), **per_example):
    config = smoke.get_config()
    config.optimizer = optimizer
    config.schedule = "constant"
    config.learning_rate = 0.1 if optimizer == "sgd" else 0.01
    config.per_example.update(per_example)
    model = models.CNN(num_classes=num_classes, conv_features=(4,), dense_features=(8,))
    make_tx = train_lib.optimizer_factory(config, steps_per_epoch=10)
    return train_lib.create_train_state(
        model, shape, make_tx, train_lib.config_hparams(config), jax.random.key(seed),
        clip_per_example=config.per_example.clip_norm > 0,
    )  # fmt: skip


def toy_data(n=40, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.integers(0, 50, (n, 8, 8, 1)).astype(np.uint8)
    for i, label in enumerate(labels):  # Each class lights a band of rows.
        images[i, 2 * label : 2 * label + 2] = 250
    return images, labels


def full_batch(images, labels):
    return {"image": images, "label": labels, "mask": np.ones(len(labels), np.float32)}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_fixed_batch_is_overfit(optimizer):
    state = small_state(optimizer)
    batch = full_batch(*toy_data(32))
    losses = []
    for _ in range(60):
        state, metrics = train_lib.train_step(state, batch)
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    assert losses[-1] < 0.2 * losses[0]
    assert losses[-1] < 0.1
    assert float(metrics["correct"]) == 32


def test_masked_examples_do_not_change_the_step():
    images, labels = toy_data(16)
    padded = {
        "image": np.concatenate([images, np.full_like(images, 255)]),
        "label": np.concatenate([labels, np.zeros_like(labels)]),
        "mask": np.concatenate([np.ones(16, np.float32), np.zeros(16, np.float32)]),
    }
    state_a, metrics_a = train_lib.train_step(small_state(), full_batch(images, labels))
    state_b, metrics_b = train_lib.train_step(small_state(), padded)
    assert float(metrics_b["count"]) == 16
    np.testing.assert_allclose(metrics_a["loss_sum"], metrics_b["loss_sum"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_train_step_does_not_retrace():
    # A model no other test uses, so its first call is the only compilation.
    state = small_state(num_classes=7)
    batch = full_batch(*toy_data(8, num_classes=7))
    before = train_lib.train_step._cache_size()
    for _ in range(3):
        state, _ = train_lib.train_step(state, batch)
    assert train_lib.train_step._cache_size() == before + 1


def test_jit_equals_eager():
    batch = full_batch(*toy_data(16))
    jitted_state, jitted = train_lib.train_step(small_state(), batch)
    with jax.disable_jit():
        eager_state, eager = train_lib.train_step(small_state(), batch)
    np.testing.assert_allclose(jitted["loss_sum"], eager["loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jitted_state.params), jax.tree.leaves(eager_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_epoch_plan_covers_every_example_once_including_the_last_partial_batch():
    indices, mask = train_lib.epoch_plan(jax.random.key(0), 3, 300, 128, 2)
    assert indices.shape == mask.shape == (2, 2, 128)
    used = indices[mask > 0]
    assert sorted(used.tolist()) == list(range(300))
    assert int((mask.reshape(-1, 128).sum(axis=1) > 0).sum()) == 3  # ceil(300 / 128) steps
    assert mask.reshape(-1, 128).sum(axis=1).tolist() == [128, 128, 44, 0]
    other_epoch, _ = train_lib.epoch_plan(jax.random.key(0), 4, 300, 128, 2)
    assert not np.array_equal(indices, other_epoch)


def test_epoch_plan_over_shards_draws_each_batch_evenly_from_every_shard():
    sizes = [7, 6, 7]  # Shards of 20 examples: [0, 7), [7, 13), [13, 20).
    indices, mask = train_lib.epoch_plan(jax.random.key(0), 1, sizes, 6, 2)
    assert indices.shape == mask.shape == (2, 2, 6)  # ceil(7 / 2) = 4 steps, 2 per dispatch.
    steps_i, steps_m = indices.reshape(-1, 6), mask.reshape(-1, 6)
    for s, (start, stop) in enumerate([(0, 7), (7, 13), (13, 20)]):
        columns_i, columns_m = steps_i[:, 2 * s : 2 * s + 2], steps_m[:, 2 * s : 2 * s + 2]
        assert sorted(columns_i[columns_m > 0].tolist()) == list(range(start, stop))
        assert np.all((columns_i >= start) & (columns_i < stop))  # Padding stays in the shard.
    assert train_lib.steps_per_epoch(sizes, 6) == 4


def test_compiled_loop_equals_per_step_loop():
    images, labels = toy_data(70)
    indices, mask = train_lib.epoch_plan(jax.random.key(0), 1, 70, 16, 3)  # 5 steps, 6 slots
    state = small_state()
    per_step = jax.tree.map(jnp.copy, state)
    state, metrics = train_lib.train_steps(
        state, train_lib.gather_batches(images, labels, indices[0], mask[0])
    )
    state, more = train_lib.train_steps(
        state, train_lib.gather_batches(images, labels, indices[1], mask[1])
    )
    assert int(metrics.pop("first_nonfinite_step")) == int(more.pop("first_nonfinite_step")) == -1
    total = jax.tree.map(lambda a, b: a + b, metrics, more)
    steps = 0
    for plan in zip(indices, mask):
        batches = train_lib.gather_batches(images, labels, *plan)
        for t in np.flatnonzero(plan[1].any(axis=1)):
            per_step, _ = train_lib.train_step(per_step, {k: v[t] for k, v in batches.items()})
            steps += 1
    assert steps == int(state.step) == int(per_step.step) == 5
    assert float(total["count"]) == 70
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(per_step.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluate_counts_every_example_and_matches_numpy():
    images, labels = toy_data(103)
    state = small_state()
    result = train_lib.evaluate(state, train_lib.eval_arrays(images, labels, 25))
    logits = np.asarray(state.apply_fn({"params": state.params}, images / np.float32(255)))
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (labels, predicted), 1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert result["count"] == 103
    assert result["confusion"] == confusion.tolist()
    assert result["accuracy"] == pytest.approx((predicted == labels).mean())
    assert result["loss"] == pytest.approx(-log_probs[np.arange(103), labels].mean(), rel=1e-5)
    per_class = [(predicted[labels == c] == c).mean() for c in range(3)]
    assert result["per_class_accuracy"] == pytest.approx(per_class)


def test_same_seed_gives_bit_identical_parameters(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    fields = dict(smoke.get_config().model)
    model = models.create_model(fields.pop("name"), 3, **fields)
    like = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params = []
    for run in ("a", "b"):
        trainer.train_and_evaluate(idx_config(data), str(tmp_path / run))
        params.append(checkpoints.load_params(tmp_path / run / "final_params", like))
    leaves_a, leaves_b = jax.tree.leaves(params[0]), jax.tree.leaves(params[1])
    assert len(leaves_a) == 8  # Two conv and two dense layers, kernel and bias each.
    for a, b, init in zip(leaves_a, leaves_b, jax.tree.leaves(like)):
        assert not np.array_equal(a, init)  # Trained, not the initial values.
        np.testing.assert_array_equal(a, b)


def test_train_and_evaluate_learns_tiny_idx_data_in_both_loops(tmp_path):
    data = write_idx_dataset(tmp_path / "data", num_train=96)
    results = {
        loop: trainer.train_and_evaluate(
            idx_config(data, loop=loop, num_epochs=4, learning_rate=5e-3), str(tmp_path / loop)
        )
        for loop in ("compiled", "per_step")
    }
    for result in results.values():
        assert result["test_count"] == 37  # 37 = 4 eval batches of 8 + 5, none lost.
        assert result["step"] == 4 * 6  # 96 / 16 = 6 steps per epoch.
        assert result["test_accuracy"] > 0.9
    assert results["compiled"]["train_loss"] == pytest.approx(
        results["per_step"]["train_loss"], rel=1e-4
    )


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optimizer", "lamb", r"config.optimizer='lamb'; choose one of"),
        ("loop", "python", r"config.loop='python'"),
        ("batch_size", 0, r"config.batch_size must be an int >= 1"),
        ("data_source", "web", r"config.data_source='web'"),
        ("warmup_epochs", 1.0, r"config.warmup_epochs=1.0 must be >= 0 and less than "),
    ],
)
def test_check_config_names_the_bad_value(key, value, message):
    config = smoke.get_config()
    config[key] = value
    with pytest.raises(trainer.ConfigError, match=message):
        trainer.check_config(config)


def test_check_config_rejects_unknown_keys_and_model_fields():
    config = smoke.get_config()
    config.lerning_rate = 0.1
    with pytest.raises(trainer.ConfigError, match=r"unknown config key\(s\) \['lerning_rate'\]"):
        trainer.check_config(config)
    config = smoke.get_config()
    config.model.dropout = 0.5
    with pytest.raises(trainer.ConfigError, match=r"config.model: .*\['dropout'\]"):
        trainer.check_config(config)


@pytest.mark.parametrize("module", [default, fast, mnist, cifar10, population_config, smoke, tpu])
def test_every_shipped_config_is_valid(module):
    trainer.check_config(module.get_config())
