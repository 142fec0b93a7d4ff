"""``data.retrieval`` without Ray: config checks before any work, the reference split's
accounting, and the DeCLIP queue surviving a checkpoint.

    pytest tests/retrieval/test_feed_config.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmray.config import ConfigError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.config.retrieval import RetrievalConfig
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import ObjectiveMix
from vlmray.pipelines.retrieval import split_stage
from vlmray.recipes import recipe
from vlmray.retrieval.split import OUTSIDE_SUBSET
from vlmray.train.checkpoint import Progress, load_checkpoint, save_checkpoint
from vlmray.validate import validate


@pytest.mark.parametrize("kwargs, message", [
    ({"attach": "nearest"}, "valid choices"),
    ({"attach": "references"}, "reference_fraction > 0"),
    ({"reference_fraction": 1.0}, "[0, 1)"),
    ({"k": 0}, ">= 1"),
    ({"attach": "references", "reference_fraction": 0.2, "embedder": "minilm"}, "text only"),
    ({"embedder": "bootstrap"}, "reference_fraction > 0"),
])
def test_bad_retrieval_settings_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        RetrievalConfig(**kwargs)


def test_defaults_pick_the_embedder_and_modality_per_method() -> None:
    ra = RetrievalConfig(attach="references", reference_fraction=0.2)
    nns = RetrievalConfig(attach="neighbour_text")
    assert (ra.resolved_embedder, ra.modality) == ("bootstrap", "image")
    assert (nns.resolved_embedder, nns.modality) == ("minilm", "text")
    assert not RetrievalConfig().enabled


@pytest.mark.parametrize("overrides, message", [
    ({"model.ra_layers": "1"}, "go together"),                               # module, no refs
    ({"data.retrieval.attach": "references", "data.retrieval.reference_fraction": "0.2"},
     "go together"),                                                          # refs, no module
    ({"objectives": '[{"name": "declip_nns", "params": {"source": "index"}}]'},
     "attach='neighbour_text'"),
])
def test_consumers_and_retrieval_must_agree_before_any_work(overrides: dict,
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(recipe("clip_tiny", **overrides))


def test_recipes_validate_and_fill_the_reference_width_later() -> None:
    ra = validate(recipe("raclip_tiny"))
    assert ra.model.ra_layers > 0 and ra.model.ra_ref_dim == 0
    nns = validate(recipe("declip_nns_tiny"))
    assert {s.name for s in nns.objectives} == {"clip", "declip_nns"}
    queue = recipe("declip_nns_tiny", **{
        "objectives": '[{"name": "clip"}, {"name": "declip_nns", "params": {"source": "queue"}}]',
        "data.retrieval.attach": "none"})
    validate(queue)                                    # the online queue needs no index


def test_split_stage_accounts_for_every_row_on_both_sides() -> None:
    keys = np.array([f"k{i:05d}" for i in range(4000)], dtype=object)
    batch = {schema.KEY: keys, schema.TEXT: keys.copy()}
    cfg = RetrievalConfig(reference_fraction=0.25, split_seed=3)
    rest = split_stage(cfg)(batch)
    boot = split_stage(RetrievalConfig(reference_fraction=0.25, split_seed=3,
                                       train_on="reference"))(batch)
    held = rest[schema.REJECT_REASON] == OUTSIDE_SUBSET
    assert 0.22 < held.mean() < 0.28
    assert set(rest[schema.REJECT_REASON][~held]) == {""}
    # the bootstrap run trains on exactly the rows the main run holds out
    assert ((boot[schema.REJECT_REASON] == "") == held).all()
    assert set(boot[schema.REJECT_REASON][~held]) == {OUTSIDE_SUBSET}
    again = split_stage(cfg)(batch)                    # stable across calls and processes
    assert (again[schema.REJECT_REASON] == rest[schema.REJECT_REASON]).all()
    assert split_stage(RetrievalConfig(attach="neighbour_text")) is None   # no split: no stage


def test_declip_queue_is_saved_and_restored_with_the_checkpoint(tmp_path: Path) -> None:
    def mix() -> ObjectiveMix:
        return ObjectiveMix.from_specs([ObjectiveSpec(name="declip_nns",
                                                      params={"queue_size": 16})])

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    first = mix()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        emb = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
        first({}, Outputs(image_embeds=emb, text_embeds=emb.flip(0),
                          logit_scale=torch.tensor(10.0)), Dist.current())
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched,
                           progress=Progress(step=3), config={}, objectives=first)
    second = mix()
    load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, objectives=second)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert int(second.state_dict()["objectives.declip_nns.queue_count"]) == 12


def test_a_reused_index_must_match_the_run(tmp_path: Path) -> None:
    from vlmray.pipelines.retrieval import _reused_embedder

    def built(**job) -> str:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        root.mkdir()
        config = {"embed": {"model": "runs/clip"}, "subset": "reference",
                  "reference_fraction": 0.2, "split_seed": 0, **job}
        (root / "stats.json").write_text(json.dumps({"config": config}))
        return str(root)

    ra = {"attach": "references", "reference_fraction": 0.2}
    assert _reused_embedder(RetrievalConfig(**ra, index_dir=built())) == "runs/clip"
    with pytest.raises(ConfigError, match="built with 'runs/clip'"):
        _reused_embedder(RetrievalConfig(**ra, index_dir=built(), embedder="runs/other"))
    with pytest.raises(ConfigError, match="not this run's reference set"):
        _reused_embedder(RetrievalConfig(**ra, index_dir=built(reference_fraction=0.1)))
    with pytest.raises(ConfigError, match="no finished"):
        _reused_embedder(RetrievalConfig(**ra, index_dir=str(tmp_path / "missing")))


def test_lookup_queries_reads_vectors_by_key_and_rejects_unindexed_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmray.pipelines.retrieval import NOT_INDEXED, LookupQueries

    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    pq.write_table(pa.table({schema.KEY: ["a", "b", "c", "d"], schema.TEXT: ["", "", "", ""],
                             schema.TEXT_EMBED: pa.array(vectors.tolist(),
                                                         pa.list_(pa.float32(), 3))}),
                   tmp_path / "part-0.parquet")
    stage = LookupQueries(str(tmp_path), schema.TEXT_EMBED)
    keys = np.array(["c", "zz", "a", "d"], dtype=object)
    out = stage({schema.KEY: keys, schema.TEXT: keys.copy()})
    assert list(out[schema.REJECT_REASON]) == ["", NOT_INDEXED, "", ""]
    got = out[schema.TEXT_EMBED]                                   # (B, D) float32
    np.testing.assert_array_equal(got[[0, 2, 3]], vectors[[2, 0, 3]])
    # a batch whose rows were all rejected earlier still gets the (B, D) column, zeros
    dead = stage({schema.KEY: keys[:2], schema.TEXT: keys[:2].copy(),
                  schema.REJECT_REASON: np.array(["x", "y"], dtype=object),
                  schema.REJECT_STAGE: np.array(["t", "t"], dtype=object)})
    assert dead[schema.TEXT_EMBED].shape == (2, 3) and not dead[schema.TEXT_EMBED].any()
