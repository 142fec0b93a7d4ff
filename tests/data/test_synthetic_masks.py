"""Ground-truth segmentation maps of the built-in data, re-rendered from the sidecars."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmray.config.data import SyntheticConfig
from vlmray.data.decode import DecodeSpec, decode_image
from vlmray.data.schema import IMAGE, LABEL, META
from vlmray.data.synthetic import (
    OBJECTS,
    SHAPE,
    SHAPES,
    has_objects,
    label_map,
    make_sample,
    make_shard,
)
from vlmray.data.synthetic_scene import _RGB, object_mask

CFG = SyntheticConfig(seed=5, num_train=120, num_eval=12, image_size=48, shard_size=120,
                      near_dup_frac=0.2)


def _overlap(sample: dict, size: int, meta: dict | None = None) -> float:
    """IoU between the decoded pixels that look like the object (closer to its colour than to
    the background's) and label_map(meta) > 0 (meta: the sample's own sidecar by default)."""
    own = json.loads(sample[META])
    labels = label_map(meta or own, size)
    pixels, reason = decode_image(sample[IMAGE], DecodeSpec(image_size=size))
    assert reason == ""
    px = pixels.transpose(1, 2, 0).astype(np.float64)                     # (S, S, 3)
    colour = np.array(_RGB[own["classname"].split()[0]], dtype=np.float64)
    background = np.median(px[label_map(own, size) == 0], axis=0)
    looks = np.linalg.norm(px - colour, axis=-1) < np.linalg.norm(px - background, axis=-1)
    inside = labels > 0
    return float((looks & inside).sum() / (looks | inside).sum())


@pytest.mark.parametrize("index", range(6))
def test_label_map_matches_the_rendered_image(index: int) -> None:
    sample = make_sample(CFG, "eval", index)
    meta = json.loads(sample[META])
    labels = label_map(sample[META], CFG.image_size)
    assert labels.shape == (48, 48) and labels.dtype == np.int64
    assert set(np.unique(labels)) == {0, meta[LABEL] + 1}
    assert _overlap(sample, CFG.image_size) > 0.8
    # another scene's objects do not explain this image
    other = json.loads(make_sample(CFG, "eval", (index + 1) % CFG.num_eval)[META])
    assert _overlap(sample, CFG.image_size, other) < 0.3


def test_near_duplicates_keep_their_geometry() -> None:
    """A near_dup is its source rescaled as a whole: the map (normalised objects) still fits
    the decoded image, at the dataset's size and at a training size."""
    rows = [r for r in make_shard(CFG, "train", 0) if json.loads(r[META])["noise"] == "near_dup"]
    assert len(rows) >= 5
    for row in rows[:5]:
        assert _overlap(row, CFG.image_size) > 0.65
        assert _overlap(row, 32) > 0.65


def test_mask_is_the_half_coverage_of_the_drawn_shape() -> None:
    """A centred square of half-side 0.85 r = 8.5 px spans rows and columns 11.5..28.5; PIL
    fills boundary pixels too, so the half-covered edge rows 11 and 28 are in."""
    mask = object_mask("square", [(0.5, 0.5, 0.25)], 40)
    rows, cols = np.nonzero(mask)
    assert 11 <= rows.min() <= 12 and 27 <= rows.max() <= 28
    assert 11 <= cols.min() <= 12 and 27 <= cols.max() <= 28
    assert 17 ** 2 <= mask.sum() <= 18 ** 2
    assert object_mask("circle", [(0.5, 0.5, 0.2)], 40).sum() == pytest.approx(
        np.pi * 8 ** 2, rel=0.12)
    with pytest.raises(ValueError, match="unknown shape"):
        object_mask("hexagon", [(0.5, 0.5, 0.2)], 40)


def test_sidecars_carry_shape_and_objects() -> None:
    for index in range(4):
        meta = json.loads(make_sample(CFG, "eval", index)[META])
        assert meta[SHAPE] in SHAPES and meta["classname"].endswith(meta[SHAPE])
        assert len(meta[OBJECTS]) == meta["count"] and has_objects(meta)
        assert all(0.0 <= v <= 1.0 for obj in meta[OBJECTS] for v in obj)


def test_old_sidecars_have_no_map() -> None:
    meta = json.loads(make_sample(CFG, "eval", 0)[META])
    del meta[OBJECTS]
    assert not has_objects(meta) and not has_objects(json.dumps(meta))
    assert not has_objects("not json") and not has_objects("[1, 2]")
    with pytest.raises(ValueError, match="objects"):
        label_map(meta, 16)
