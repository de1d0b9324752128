"""Training steps, epoch plans, the compiled loop, evaluation, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import idx_config, one_step, step_program, write_idx_dataset

from cnnflat_jax.configs import smoke
from cnnflat_jax.data import batching, transforms
from cnnflat_jax.nn import models
from cnnflat_jax.run import checkpoints, trainer
from cnnflat_jax.train import evaluation, train_lib
from cnnflat_jax.train.train_lib import LOOPS


def small_state(
    optimizer="adam", num_classes=3, seed=0, shape=(8, 8, 1), max_shift=0,
    compute_dtype="float32", **per_example,
):  # fmt: skip
    config = smoke.get_config()
    config.optimizer = optimizer
    config.schedule = "constant"
    config.learning_rate = 0.1 if optimizer == "sgd" else 0.01
    config.per_example.update(per_example)
    model = models.CNN(num_classes=num_classes, conv_features=(4,), dense_features=(8,))
    make_tx = train_lib.optimizer_factory(config, steps_per_epoch=10)
    return train_lib.create_train_state(
        model, shape, make_tx, train_lib.config_hparams(config), jax.random.key(seed),
        clip_per_example=config.per_example.clip_norm > 0, max_shift=max_shift,
        compute_dtype=compute_dtype,
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


def step_once(batch, **state_fields):
    """A fresh ``small_state`` after one compiled step on ``batch``."""
    state = small_state(**state_fields)
    return one_step(step_program(state, len(batch["label"])), state, batch)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_fixed_batch_is_overfit(optimizer):
    state = small_state(optimizer)
    batch = full_batch(*toy_data(32))
    program = step_program(state, 32)
    losses = []
    for _ in range(60):
        state, metrics = one_step(program, state, batch)
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
    state_a, metrics_a = step_once(full_batch(images, labels))
    state_b, metrics_b = step_once(padded)
    assert float(metrics_b["count"]) == 16
    np.testing.assert_allclose(metrics_a["loss_sum"], metrics_b["loss_sum"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_jitted_train_step_does_not_retrace():
    # A model no other test uses, so its first call is the only compilation.
    state = small_state(num_classes=7)
    batch = full_batch(*toy_data(8, num_classes=7))
    traces = []

    def traced(state, batch):  # Python runs this body only when JAX traces it.
        traces.append(1)
        return train_lib.train_step(state, batch)

    step = jax.jit(traced)
    for _ in range(3):
        state, _ = step(state, batch)
    assert len(traces) == 1


def test_a_built_program_refuses_a_batch_of_another_shape():
    state = small_state()
    program = step_program(state, 16)
    with pytest.raises(
        TypeError, match=r"compiled with uint8\[16,8,8,1\] and called with uint8\[8,8,8,1\]"
    ):
        one_step(program, state, full_batch(*toy_data(8)))


def test_compiled_program_equals_eager_step():
    batch = full_batch(*toy_data(16))
    compiled_state, compiled = step_once(batch)
    with jax.disable_jit():
        eager_state, eager = train_lib.train_step(small_state(), batch)
    np.testing.assert_allclose(compiled["loss_sum"], eager["loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(compiled_state.params), jax.tree.leaves(eager_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_loop_equals_per_step_loop():
    images, labels = toy_data(70)
    indices, mask = batching.epoch_plan(jax.random.key(0), 1, 70, 16, 3)  # 5 steps, 6 slots
    states = {loop: small_state() for loop in LOOPS}
    programs = {loop: step_program(states[loop], 16, loop=loop, steps=3) for loop in LOOPS}
    totals = {}
    for loop, program in programs.items():
        for plan in zip(indices, mask):
            batches = batching.gather_batches(images, labels, *plan)
            states[loop], sums, divergence = program(states[loop], batches)
            assert divergence.step == -1 and not divergence.diverged
            totals[loop] = sums if loop not in totals else jax.tree.map(np.add, totals[loop], sums)
    assert int(states["compiled"].step) == int(states["per_step"].step) == 5
    assert float(totals["compiled"]["count"]) == float(totals["per_step"]["count"]) == 70
    np.testing.assert_allclose(
        totals["compiled"]["loss_sum"], totals["per_step"]["loss_sum"], rtol=1e-5
    )
    for a, b in zip(
        jax.tree.leaves(states["compiled"].params), jax.tree.leaves(states["per_step"].params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loop", LOOPS)
def test_both_loops_report_the_first_diverged_step_and_its_loss(loop):
    images, labels = toy_data(48)
    mask = np.ones((3, 16), np.float32)
    batches = batching.gather_batches(images, labels, np.arange(48).reshape(3, 16), mask)

    def divergence(learning_rate, max_loss):
        state = small_state("sgd")
        state = state.replace(
            hparams={**state.hparams, "learning_rate": jnp.float32(learning_rate)}
        )
        program = step_program(state, 16, loop=loop, steps=3, max_loss=max_loss)
        _, sums, divergence = program(state, batches)
        assert divergence.diverged == (divergence.step >= 0)
        return divergence.step, divergence.loss, sums

    # A sane step: nothing diverges, whatever the bound.
    assert divergence(0.1, 1e4)[0] == -1
    # Step 0 trains at 1e9: its own loss is sane, step 1's is huge but finite.
    first, loss, sums = divergence(1e9, 1e4)
    assert first == 1 and 1e4 < loss < np.inf
    # Without a bound only NaN or Inf count: the huge steps go on until one is not finite.
    first, loss, sums = divergence(1e30, 0.0)
    assert first >= 1 and not np.isfinite(loss)
    assert not np.isfinite(sums["loss_sum"])


def test_evaluate_counts_every_example_and_matches_numpy():
    images, labels = toy_data(103)
    state = small_state()
    result = evaluation.evaluate(state, batching.eval_arrays(images, labels, 25))
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


def test_shift_augmentation_is_seeded_by_step_and_changes_training(tmp_path):
    data = write_idx_dataset(tmp_path / "data")
    fields = dict(smoke.get_config().model)
    model = models.create_model(fields.pop("name"), 3, **fields)
    like = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params = {}
    for run, shift in (("plain", 0), ("a", 2), ("b", 2)):
        trainer.train_and_evaluate(idx_config(data, augment_shift=shift), str(tmp_path / run))
        params[run] = jax.tree.leaves(
            checkpoints.load_params(tmp_path / run / "final_params", like)
        )
    for a, b, plain in zip(params["a"], params["b"], params["plain"]):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, plain)


def test_a_shifted_batch_trains_as_the_step_draws_it():
    """The step's shifts are random_shift's with key fold_in(fold_in(key, step), 2)."""
    images, labels = toy_data(16)
    augmented = small_state(max_shift=2)
    step_key = jax.random.fold_in(augmented.key, augmented.step)
    moved = transforms.random_shift(jax.random.fold_in(step_key, 2), jnp.asarray(images), 2)
    state_a, _ = jax.jit(train_lib.train_step)(augmented, full_batch(images, labels))
    state_b, _ = jax.jit(train_lib.train_step)(small_state(), full_batch(np.asarray(moved), labels))
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
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


def test_bfloat16_compute_keeps_float32_parameters_state_and_sums():
    batch = full_batch(*toy_data(32))
    exact = small_state()
    state = small_state(compute_dtype="bfloat16")
    # The same float32 parameters; the model's arithmetic in bfloat16 (8 bits of
    # mantissa: about 2 significant digits), the logits handed back as float32.
    images = train_lib.normalize_images(batch["image"])
    logits = state.apply_fn({"params": state.params}, images)
    reference = np.asarray(exact.apply_fn({"params": exact.params}, images))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.02)
    assert not np.array_equal(np.asarray(logits), reference)  # It did compute in bfloat16.
    program = step_program(state, 32)
    losses = []
    for _ in range(40):
        state, metrics = one_step(program, state, batch)
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert metrics["loss_sum"].dtype == np.float32 and losses[-1] < 0.5 * losses[0]
