"""Embedding and FAISS retrieval, as stages and index tools.

    embed.py   EmbedStage: images and/or captions -> L2-normalised vectors (vlmray.embedders)
    build.py   FAISS index choice, training and parallel fill from embedding shards
    index.py   a built index on disk: load, search, report
    search.py  SearchStage / SearchActor: each row's k nearest neighbours
    attach.py  AttachNeighbours: what the neighbours carry (reference embeddings, a caption)
    split.py   the stable reference/train split of RA-CLIP

The plans that compose them live in ``vlmray.pipelines``: ``index`` (``jobs/build_index.py``)
and ``retrieval`` (a training run's ``data.retrieval``).
"""
