"""Index pipeline: read -> [reference split] -> embed (Ray Data actors) -> embedding shards ->
FAISS index per modality (trained once, filled in parallel Ray tasks, merged, auto-tuned).

The steps live in :mod:`vlmray.retrieval.pipeline` (training runs with ``data.retrieval`` build
their index with the same code); read that module to compose your own.

    from vlmray.pipelines.index import IndexJobConfig, load_built, run
    stats = run(IndexJobConfig(input="s3://curated/v1", output="s3://index/v1",
                               embed=EmbedConfig(model="s3://runs/clip", modality="both")))
    scores, keys = load_built("s3://index/v1", "image").search(queries, k=10)
"""

from vlmray.config.jobs import IndexJobConfig
from vlmray.retrieval.pipeline import input_uri, load_built, run, validate_job

__all__ = ["IndexJobConfig", "input_uri", "load_built", "run", "validate_job"]
