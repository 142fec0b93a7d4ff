"""The sample schema: the only place column names are spelled.

Every stage reads and writes Arrow/NumPy batches keyed by these names. Raw shards follow the
img2dataset/webdataset layout (``{key}.jpg``, ``{key}.txt``, ``{key}.json``); once decoded, rows
carry the columns below.
"""

from __future__ import annotations

# --- raw sample columns ---------------------------------------------------------------------
KEY = "key"                        # str: stable sample id, unique within a dataset
IMAGE = "image"                    # bytes: encoded image (JPEG/PNG) as read from a shard
TEXT = "text"                      # str: the (noisy) caption / alt-text
META = "meta"                      # str: the shard's JSON sidecar, verbatim
TEXTS_AUG = "texts_aug"            # list<str>: LLM rewrites of TEXT (La-CLIP)
SYNTHETIC_CAPTION = "synthetic_caption"  # str: caption generated from the image (ALIP)
LABEL = "label"                    # int: class index, for image-text-label objectives and eval
BOXES = "boxes"                    # list<list<float>>: (x0, y0, x1, y1) in [0, 1], region-word
PHRASES = "phrases"                # list<str>: one phrase per box
NEIGHBOURS = "neighbours"          # list<str>: keys of retrieved neighbours

# --- columns produced by ingest for training ------------------------------------------------
PIXELS = "pixels"                  # uint8 (3, H, W): decoded, resized image
TOKENS = "tokens"                  # int64 (L,): token ids, padded
TOKEN_MASK = "token_mask"          # int64 (L,): 1 for real tokens, 0 for padding

# --- accounting -------------------------------------------------------------------------------
REJECT_REASON = "reject_reason"    # str: "" for accepted rows, else why the row was dropped

# Webdataset member suffixes for the raw columns.
WDS_SUFFIX = {IMAGE: "jpg", TEXT: "txt", META: "json"}

__all__ = [
    "KEY", "IMAGE", "TEXT", "META", "TEXTS_AUG", "SYNTHETIC_CAPTION", "LABEL", "BOXES",
    "PHRASES", "NEIGHBOURS", "PIXELS", "TOKENS", "TOKEN_MASK", "REJECT_REASON", "WDS_SUFFIX",
]
