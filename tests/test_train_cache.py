"""The frozen-feature cache: same loss as without it, and hits from the second epoch on."""
from __future__ import annotations

import numpy as np
import torch


def _batch(cfg, b=2):
    from pics_model.data import build_item, collate

    rng = np.random.default_rng(0)
    r, p = cfg.resolution, cfg.object_encoder.image_size
    items = []
    for _ in range(b):
        s = {"image": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
             "boxes_expanded": np.array([[4, 4, 30, 40], [20, 10, 60, 44]], np.float32),
             "boxes_tight": np.array([[6, 6, 28, 38], [22, 12, 58, 42]], np.float32),
             "patches": rng.integers(0, 255, (2, p, p, 3), dtype=np.uint8),
             "patch_masks": np.full((2, p, p), 255, np.uint8)}
        items.append(build_item(s, r, None, None, object_size=p, collage=cfg.collage_hint))
    return collate(items)


def test_cache_matches_uncached_and_hits():
    from pics_model.config import get_preset
    from pics_model.modeling_pics import PICSModel

    from tasks.train.cache import attach_feature_cache

    torch.manual_seed(0)
    plain = PICSModel(get_preset("tiny"), load_pretrained=False)
    cached = PICSModel(get_preset("tiny"), load_pretrained=False)
    cached.load_state_dict(plain.state_dict())
    # .train() as the trainer does: it also puts the frozen backbone's BatchNorm in eval mode,
    # which a freshly constructed model does not have yet
    plain.train()
    cached.train()
    caches = attach_feature_cache(cached, objects=True, max_mb=64)
    batch = _batch(plain.config)
    with torch.no_grad():
        ref = [plain.training_loss(batch, torch.Generator().manual_seed(s))[0] for s in (1, 2)]
        got = [cached.training_loss(batch, torch.Generator().manual_seed(s))[0] for s in (1, 2)]
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    vae, obj = caches["vae"].stats(), caches["objects"].stats()
    assert vae["misses"] == 2 and vae["hits"] == 2  # second pass over the same two targets
    assert obj["hits"] > 0 and obj["entries"] <= 5  # two distinct patches per sample, plus the zero image
    assert ref[0] != ref[1]  # the step's own noise still differs per generator
