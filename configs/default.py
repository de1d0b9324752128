"""Default: the classic CNN on Fashion-MNIST, Adam with warmup + cosine decay.

python train.py --config configs/default.py --workdir runs/default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data: a TFDS catalog name; "auto" also finds local IDX copies (README).
    config.dataset = "fashion_mnist"
    config.data_source = "auto"  # auto | tfds | idx
    config.data_dir = ""  # TFDS data directory; "" = TFDS's default.
    config.idx_dir = ""  # Directory of MNIST-format IDX files.
    # 0 = the dataset's own class count (TFDS's metadata; for IDX files, 10 for
    # mnist, fashion_mnist and kmnist). Every label must lie in [0, num_classes).
    config.num_classes = 0
    config.num_train_examples = 0  # 0 = all; else the first N.
    config.num_test_examples = 0
    config.validation_examples = 0  # Held out from the end of the training set.
    config.permute_pixels = False  # Shuffle every image's pixels by one fixed permutation.
    # memory: load whole splits into host memory. grain: stream training batches
    # from ArrayRecord files through Grain (README, "Streaming with Grain").
    config.input_pipeline = "memory"  # memory | grain
    # grain: ArrayRecord files from python -m cnnflat_jax.array_records; "" =
    # TFDS's ArrayRecord data source (the dataset prepared with that file format).
    config.array_record_dir = ""

    config.model = ml_collections.ConfigDict(
        dict(
            name="cnn",
            conv_features=(32, 64),
            kernel_size=3,
            padding="SAME",  # SAME | VALID (convs; pools are VALID)
            pool="max",  # max | avg | stride (no pooling: convs stride by pool_window)
            pool_window=2,
            dense_features=(256,),
            permute_flat=False,  # Shuffle the flattened vector by one fixed permutation.
            conv_lowering="auto",  # auto | lax | nhwc_grads | im2col | hybrid (ops.conv2d)
        )
    )

    config.optimizer = "adam"  # sgd | adam | adamw
    config.learning_rate = 2e-3
    config.momentum = 0.9  # sgd only
    config.weight_decay = 0.0  # adamw only
    config.schedule = "warmup_cosine"  # constant | warmup_cosine
    config.warmup_epochs = 1.0

    # Augmentation: every training image moves by a random shift of up to N
    # pixels each step (zero fill; 0 = off).
    config.augment_shift = 0

    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 10
    config.seed = 0

    # Data parallelism (see cnnflat_jax/sharding.py): the global batch is
    # split over num_devices devices (0 = all, across all processes); the data
    # order is defined over data_shards shards (0 = one per process).
    config.num_devices = 0
    config.data_shards = 0
    # Checkpoints in workdir/checkpoints: every N steps (rounded to whole
    # dispatches) and at each epoch end; a rerun with the same workdir resumes.
    config.checkpoint_every_steps = 1000
    config.checkpoints_to_keep = 3

    config.loop = "compiled"  # compiled | per_step
    config.steps_per_dispatch = 50  # Steps per compiled program call.
    config.progress_bar = True
    config.stop_at_test_accuracy = 0.0  # > 0: stop once an epoch reaches it.
    # Divergence guard: a step whose mean training loss is NaN, Inf or above
    # max_loss stops the run (exit 1), keeping the last good checkpoint. 0 = NaN/Inf only.
    config.max_loss = 1e4

    # K models in one program (vmap). Lists give one value per member; empty
    # lists use the values above (seeds: seed, seed + 1, ...).
    config.population = ml_collections.ConfigDict(
        dict(
            size=1,
            seeds=(),
            learning_rates=(),
            weight_decays=(),
            momenta=(),
            independent_data_order=False,  # True: each member's order from its seed.
        )
    )
    # Per-example gradients: DP-SGD clipping + noise (on when clip_norm > 0),
    # and a grid of the training examples with the largest gradient norms.
    config.per_example = ml_collections.ConfigDict(
        dict(
            clip_norm=0.0,
            noise_multiplier=0.0,
            report_hardest=0,  # > 0: how many to show in hardest_examples.png.
            report_scan_examples=5000,  # How many training examples to score.
        )
    )
    return config
