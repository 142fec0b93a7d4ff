"""Composed end-to-end pipelines (examples to copy): curate, index."""
