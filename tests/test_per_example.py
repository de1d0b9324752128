"""Per-example gradients, DP-SGD aggregation, and the hardest-examples report."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_step, step_program

from cnnflat_jax.configs import smoke
from cnnflat_jax.data.examples import Arrays
from cnnflat_jax.nn import models
from cnnflat_jax.run import hardest
from cnnflat_jax.train import per_example, train_lib


def setup(num=6, seed=0):
    model = models.CNN(num_classes=3, conv_features=(4,), dense_features=(8,))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(seed)
    batch = {
        "image": rng.integers(0, 255, (num, 8, 8, 1), dtype=np.uint8),
        "label": rng.integers(0, 3, num).astype(np.int32),
    }
    return model, params, batch


def loss_of(apply_fn):
    return lambda params, example: train_lib.example_loss(params, apply_fn, example)


def test_per_example_grads_equal_gradients_taken_one_at_a_time():
    model, params, batch = setup()
    grads = per_example.per_example_grads(loss_of(model.apply), params, batch)
    for i in range(6):
        one = jax.grad(loss_of(model.apply))(params, jax.tree.map(lambda x, i=i: x[i], batch))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


def flat(grads):
    return np.concatenate(
        [np.asarray(g).reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], 1
    )


def test_private_mean_clips_each_example_then_averages():
    model, params, batch = setup()
    grads = per_example.per_example_grads(loss_of(model.apply), params, batch)
    mask = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
    g = flat(grads).astype(np.float64)
    norms = np.linalg.norm(g, axis=1)
    clip = np.median(norms)  # Clips about half of them.
    mean, got_norms = per_example.private_mean(grads, mask, clip, 0.0, jax.random.key(0))
    expected = (g[:5] * np.minimum(1, clip / norms[:5])[:, None]).sum(axis=0) / 5
    np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda x: x[None], mean))[0], expected, rtol=1e-4, atol=1e-7
    )


def test_private_mean_without_clipping_or_noise_is_the_mean_gradient():
    model, params, batch = setup()
    grads = per_example.per_example_grads(loss_of(model.apply), params, batch)
    mean, _ = per_example.private_mean(grads, jnp.ones(6), 1e9, 0.0, jax.random.key(0))
    batch_mask = {**batch, "mask": jnp.ones(6)}
    full = jax.grad(lambda p: train_lib.loss_and_metrics(p, model.apply, batch_mask)[0])(params)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_private_mean_noise_has_std_sigma_c_over_count():
    grads = {"w": jnp.zeros((4, 200_000))}
    mean, _ = per_example.private_mean(grads, jnp.ones(4), 2.0, 1.5, jax.random.key(3))
    assert float(jnp.std(mean["w"])) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert abs(float(jnp.mean(mean["w"]))) < 0.01


def dp_state(**per_example_fields):
    config = smoke.get_config()
    config.schedule = "constant"
    config.per_example.update(per_example_fields)
    model = models.CNN(num_classes=3, conv_features=(4,), dense_features=(8,))
    return train_lib.create_train_state(
        model, (8, 8, 1), train_lib.optimizer_factory(config, 10), train_lib.config_hparams(config),
        jax.random.key(0), clip_per_example=config.per_example.clip_norm > 0,
    )  # fmt: skip


def dp_step(state, batch):
    """One compiled training step (DP-SGD when the state clips per example)."""
    return one_step(step_program(state, len(batch["label"])), state, batch)


def test_dp_step_without_effective_clipping_or_noise_equals_the_plain_step():
    _, _, batch = setup(8)
    batch["mask"] = np.ones(8, np.float32)
    plain, _ = dp_step(dp_state(), batch)
    private, metrics = dp_step(dp_state(clip_norm=1e9), batch)
    assert float(metrics["count"]) == 8
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(private.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dp_noise_differs_per_step_and_is_reproducible():
    _, _, batch = setup(8)
    batch["mask"] = np.ones(8, np.float32)

    def update(step, noise_multiplier):
        """The parameter change of one step from the same start, at train step ``step``."""
        state = dp_state(clip_norm=0.5, noise_multiplier=noise_multiplier)
        start = jax.tree.map(np.asarray, state.params)
        state, _ = dp_step(state.replace(step=jnp.int32(step)), batch)
        return flat(jax.tree.map(lambda a, b: (np.asarray(a) - b)[None], state.params, start))

    # Without noise the step counter changes nothing; with it, each step draws anew.
    np.testing.assert_array_equal(update(0, 0.0), update(1, 0.0))
    noisy = [update(step, 1.0) for step in (0, 1, 0)]
    assert np.abs(noisy[0] - noisy[1]).max() > 1e-4
    np.testing.assert_array_equal(noisy[0], noisy[2])  # The same step: the same noise.


def test_hardest_report_lists_the_largest_gradient_norms(tmp_path):
    state = dp_state()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (150, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 150).astype(np.int32)
    train = Arrays(images, labels)
    rows = hardest.report(state, train, str(tmp_path), num_shown=5, num_scanned=140)
    norms = []
    for i in range(140):
        g = jax.grad(loss_of(state.apply_fn))(
            state.params, {"image": images[i], "label": labels[i]}
        )
        norms.append(float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))))
    top = np.argsort(norms)[::-1][:5]
    assert [r["index"] for r in rows] == top.tolist()
    np.testing.assert_allclose([r["grad_norm"] for r in rows], np.asarray(norms)[top], rtol=1e-4)
    assert json.loads((tmp_path / "hardest_examples.json").read_text()) == rows
    assert (tmp_path / "hardest_examples.png").read_bytes()[:4] == b"\x89PNG"
