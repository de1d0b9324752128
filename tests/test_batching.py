"""Epoch plans, host gathering, eval padding and the validation split."""

import jax
import numpy as np

from cnnflat_jax.data import batching, input_pipeline
from cnnflat_jax.data.examples import Arrays


def test_epoch_plan_covers_every_example_once_including_the_last_partial_batch():
    indices, mask = batching.epoch_plan(jax.random.key(0), 3, 300, 128, 2)
    assert indices.shape == mask.shape == (2, 2, 128)
    used = indices[mask > 0]
    assert sorted(used.tolist()) == list(range(300))
    assert int((mask.reshape(-1, 128).sum(axis=1) > 0).sum()) == 3  # ceil(300 / 128) steps
    assert mask.reshape(-1, 128).sum(axis=1).tolist() == [128, 128, 44, 0]
    other_epoch, _ = batching.epoch_plan(jax.random.key(0), 4, 300, 128, 2)
    assert not np.array_equal(indices, other_epoch)


def test_epoch_plan_over_shards_draws_each_batch_evenly_from_every_shard():
    sizes = [7, 6, 7]  # Shards of 20 examples: [0, 7), [7, 13), [13, 20).
    indices, mask = batching.epoch_plan(jax.random.key(0), 1, sizes, 6, 2)
    assert indices.shape == mask.shape == (2, 2, 6)  # ceil(7 / 2) = 4 steps, 2 per dispatch.
    steps_i, steps_m = indices.reshape(-1, 6), mask.reshape(-1, 6)
    for s, (start, stop) in enumerate([(0, 7), (7, 13), (13, 20)]):
        columns_i, columns_m = steps_i[:, 2 * s : 2 * s + 2], steps_m[:, 2 * s : 2 * s + 2]
        assert sorted(columns_i[columns_m > 0].tolist()) == list(range(start, stop))
        assert np.all((columns_i >= start) & (columns_i < stop))  # Padding stays in the shard.
    assert batching.steps_per_epoch(sizes, 6) == 4


def test_members_plan_stacks_one_order_per_member_with_one_mask():
    keys = [jax.random.key(1), jax.random.key(2)]
    indices, mask = batching.members_plan(keys, 2, 30, 8, 2)
    alone = [batching.epoch_plan(key, 2, 30, 8, 2) for key in keys]
    assert indices.shape == (2, 2, 2, 8) and mask.shape == (2, 2, 8)
    for k, (member_indices, member_mask) in enumerate(alone):
        np.testing.assert_array_equal(indices[:, :, k], member_indices)
        np.testing.assert_array_equal(mask, member_mask)
    one_indices, _ = batching.members_plan(keys[:1], 2, 30, 8, 2)
    np.testing.assert_array_equal(one_indices, alone[0][0])


def test_eval_arrays_pads_with_masked_zeros_to_whole_batches():
    images = np.arange(7 * 2 * 2 * 1, dtype=np.uint8).reshape(7, 2, 2, 1) + 1
    labels = np.arange(7, dtype=np.int32) + 1
    out_images, out_labels, mask = batching.eval_arrays(images, labels, 3, num_batches=4)
    assert out_images.shape == (4, 3, 2, 2, 1) and out_labels.shape == mask.shape == (4, 3)
    np.testing.assert_array_equal(out_images.reshape(12, 2, 2, 1)[:7], images)
    assert not out_images.reshape(12, 2, 2, 1)[7:].any()
    assert out_labels.reshape(-1).tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0]
    assert mask.reshape(-1).tolist() == [1] * 7 + [0] * 5


def dataset(num_train):
    images = np.arange(num_train, dtype=np.uint8).reshape(num_train, 1, 1, 1)
    return input_pipeline.Dataset(
        name="toy", source="memory", num_classes=3,
        train=Arrays(images, np.arange(num_train, dtype=np.int32) % 3),
        test_images=images[:2], test_labels=np.zeros(2, np.int32),
        train_total=num_train, test_total=2,
    )  # fmt: skip


def test_split_validation_holds_out_the_end_of_every_shard():
    train, validation = batching.split_validation(dataset(20), 4, 2)  # Shards [0, 10), [10, 20).
    assert train.shard_sizes == [8, 8] and train.offset == 0
    assert train.examples.images[:, 0, 0, 0].tolist() == [*range(8), *range(10, 18)]
    assert validation[0][:, 0, 0, 0].tolist() == [8, 9, 18, 19]
    assert validation[1].tolist() == [8 % 3, 9 % 3, 18 % 3, 19 % 3]
    train, validation = batching.split_validation(dataset(20), 0, 1)
    assert validation is None and train.shard_sizes == [20]


def test_train_data_gathers_this_process_columns_of_a_plan():
    train, _ = batching.split_validation(dataset(20), 0, 1)
    indices, mask = batching.epoch_plan(jax.random.key(0), 1, 20, 8, 3)
    batches = train.batches(indices[0], mask[0])
    assert batches["image"].shape == (3, 8, 1, 1, 1)
    np.testing.assert_array_equal(batches["image"][..., 0, 0, 0], indices[0])
    np.testing.assert_array_equal(batches["label"], indices[0] % 3)
    np.testing.assert_array_equal(batches["mask"], mask[0])


def test_a_plan_counts_its_own_steps_skipping_all_padding_ones():
    plan = batching.epoch_plan(jax.random.key(0), 1, 300, 128, 2)  # 3 steps with examples, 1 not.
    assert len(plan) == 2 and plan.steps() == 3
    assert [plan.steps(0), plan.steps(1), plan.steps(slice(0, 1)), plan.steps(slice(0, 0))] == [
        2, 1, 2, 0,
    ]  # fmt: skip


def test_the_memory_stream_reads_each_dispatch_when_due_and_keeps_its_place():
    train, _ = batching.split_validation(dataset(20), 0, 1)
    plan = batching.epoch_plan(jax.random.key(0), 1, 20, 4, 1)  # 5 dispatches of one step.
    stream = train.stream(plan, 0, None)
    first = next(stream)
    assert stream.get_state() == {"next_index": 1}
    np.testing.assert_array_equal(first["image"][..., 0, 0, 0], plan.indices[0])
    rest = list(train.stream(plan, 2, stream.get_state()))  # Goes on from dispatch 2.
    assert len(rest) == 3
    for d, batches in enumerate(rest, start=2):
        np.testing.assert_array_equal(batches["label"], plan.indices[d] % 3)
