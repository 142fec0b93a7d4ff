"""Composed pipelines: the one place Ray Data plans are put together from stages of several
layers (data, rewrite, retrieval, the embedders), and the entry points the ``jobs/`` scripts
call.

    feed.py     the training feed: read -> [download] -> [curate] -> [rewrite] -> [retrieval]
                -> decode -> split, streamed into Ray Train (``vlmray.api.run`` uses it)
    curate.py   ``jobs/curate.py``: curated shards + rejects/ + stats.json
    rewrite.py  ``jobs/rewrite_captions.py``: shards with rewritten / synthetic captions
    retrieval.py  ``data.retrieval``'s plan: the index built (or reused), neighbour stages
    index.py    ``jobs/build_index.py``: embeddings + FAISS indexes (also run by retrieval.py)

An installed package like the rest of vlmray (no ``sys.path`` edits); copy a module to build
your own plan.
"""
