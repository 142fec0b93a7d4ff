"""Data: the sample schema, shard I/O, the built-in generator, decoding and Ray Data ingest."""
