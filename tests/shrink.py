"""The real params.yaml, shrunk: what integration tests override so the whole pipeline takes
about a minute on 2 cores. Same code paths, same classes; only counts and sizes change."""

SHRUNK_OVERRIDES: dict = {
    "make_sample.num_images": 16,
    "decompose.test_fraction": 0.4,
    "decompose.preview_resolution": 64,
    "render_priors.num_views": 2,
    "render_priors.resolution": 64,
    "train.steps": 4,
    "train.num_workers": 1,
    "train.batch_size": 2,
    "train.autoencoder_steps": 4,
    "train.warmup_steps": 1,
    "train.sample_every": 0,
    "train.heldout_samples": 2,
    "train.checkpoint_every": 2,
    "evaluate.steps": 2,
    "evaluate.max_samples": 1,  # one sample: no Fréchet distance (it needs two; minutes on a loaded box)
    "evaluate.num_actors": 1,
    "location.num_scenes": 8,
    "location.test_fraction": 0.4,
    "location.mle_steps": 20,
    "location.dpo_steps": 5,
    "location.ks": [10, 20],
    "location.bootstrap": 20,
    "analogy.num_scenes": 6,
    "analogy.heldout_scenes": 2,
    "analogy.steps": 2,
    "analogy.eval_pairs": 1,
    "analogy.hard_pairs": 1,
    "analogy.transfer_samples": 1,
    "layout.max_elements": 8,
    "layout.target_size": 64,
    "layout.iterations": [20, 10, 10],
}


def as_set_args(overrides: dict = SHRUNK_OVERRIDES) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]
