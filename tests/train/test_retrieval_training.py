"""Training with FAISS neighbours, end to end on one local Ray: RA-CLIP (a bootstrapped frozen
embedder, a held-out reference set, references for training and held-out images) and DeCLIP's
nearest-neighbour supervision (MiniLM captions index, each row's neighbour caption)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import vlmray
from tests.train.test_pipeline_ray import SMALL
from vlmray.data import schema
from vlmray.pipelines.index import load_built
from vlmray.retrieval.embed import read_embeddings
from vlmray.retrieval.search import search_excluding
from vlmray.retrieval.split import OUTSIDE_SUBSET, reference_mask

STEPS = {**SMALL, "train.steps": 4, "train.checkpoint_every": 0, "eval.every": 0}


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_raclip_trains_with_references_from_a_held_out_set(ray_local, tmp_path: Path) -> None:
    run = tmp_path / "ra"
    # 3 bootstrap steps leave every image at cosine ~1: the duplicate check must be off
    cfg = vlmray.recipe("raclip_tiny", **{**STEPS, "data.retrieval.bootstrap_steps": 3,
                                          "data.retrieval.k": 4,
                                          "data.retrieval.duplicate_threshold": 2.0})
    m = vlmray.run(cfg, output=str(run)).metrics
    assert m["steps"] == 4 and m["zero_shot_top1"] is not None

    # the reference set never reaches training: it leaves ingest with a reason, counted
    assert m["rows_in"] == 400 == m["rows_accepted"] + m["rows_rejected"]
    held = m["reject_reasons"][OUTSIDE_SUBSET]
    assert 50 <= held <= 110                                       # ~20% of 400
    stats = json.loads((run / "retrieval" / "stats.json").read_text())
    assert stats["subset"] == "reference" and stats["rows_in"] == 400
    assert stats["rows_embedded"] + stats["rows_rejected"] == 400 - stats["rows_outside_subset"]
    index = load_built(str(run / "retrieval"), "image")
    keys = list(index.keys)
    assert reference_mask(keys, 0.2).all()                         # only reference rows indexed

    # the bootstrap embedder trained on exactly that set, and its width became ra_ref_dim
    boot = json.loads((run / "retrieval" / "bootstrap" / "metrics.json").read_text())
    assert boot["steps"] == 3 and boot["reject_reasons"][OUTSIDE_SUBSET] == 400 - held
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["ra_ref_dim"] == index.report["dim"] == 32

    # held-out images got references too, and they point into the reference set
    refs = pq.read_table(run / "retrieval" / "eval_refs.parquet")
    mask = np.asarray(refs.column(schema.REF_MASK).to_pylist())
    assert refs.num_rows >= 55 and mask.shape[1] == 4 and mask.sum(1).min() >= 1


def test_declip_nns_trains_with_neighbour_captions(ray_local, tmp_path: Path) -> None:
    run = tmp_path / "nns"
    cfg = vlmray.recipe("declip_nns_tiny", **STEPS)
    m = vlmray.run(cfg, output=str(run)).metrics
    assert m["steps"] == 4 and m["zero_shot_top1"] is not None
    assert OUTSIDE_SUBSET not in m["reject_reasons"]               # no split for NNS
    stats = json.loads((run / "retrieval" / "stats.json").read_text())
    text = stats["indexes"]["text"]
    assert text["dim"] == 384 and text["n"] == stats["rows_embedded"] == 400
    rows = history(run)
    assert all(np.isfinite(r["loss/declip_nns"]) and "declip_nns/nn_acc" in r for r in rows)

    # the neighbours training read: never the row itself, and close in MiniLM's space
    keys, vectors = read_embeddings(str(run / "retrieval" / "embeddings"), schema.TEXT_EMBED)
    index = load_built(str(run / "retrieval"), "text")
    scores, found = search_excluding(index, vectors[:50], 1, exclude=[keys[:50]],
                                     duplicate_threshold=0.99)
    assert (found[:, 0] != keys[:50]).all() and np.median(scores[:, 0]) > 0.7
