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
NEIGHBOURS = "neighbours"          # list<str>: keys of retrieved neighbours, best first
NEIGHBOUR_SCORES = "neighbour_scores"  # list<float>: similarity of each neighbour (same order)

# --- retrieval: embeddings and what training rows carry from their neighbours ---------------
IMAGE_EMBED = "image_embed"        # float32 (D,): an image embedding (embedding shards, queries)
TEXT_EMBED = "text_embed"          # float32 (D,): a caption embedding
REF_IMAGE_EMBEDS = "ref_image_embeds"  # float32 (k, D_ref): retrieved reference images (RA-CLIP)
REF_TEXT_EMBEDS = "ref_text_embeds"    # float32 (k, D_ref): their captions' embeddings
REF_MASK = "ref_mask"              # float32 (k,): 1 where slot i holds a reference, 0 = padding
NN_TEXT = "nn_text"                # str: caption of the nearest non-duplicate neighbour (DeCLIP)
NN_TOKENS = "nn_tokens"            # int64 (L,): NN_TEXT tokenised
NN_TOKEN_MASK = "nn_token_mask"    # int64 (L,)

# --- columns produced by ingest for training ------------------------------------------------
PIXELS = "pixels"                  # uint8 (3, H, W): decoded, resized image
TOKENS = "tokens"                  # int64 (L,): token ids, padded
TOKEN_MASK = "token_mask"          # int64 (L,): 1 for real tokens, 0 for padding

# --- augmented views (vlmray.data.views; DeCLIP, PyramidCLIP, CLIPPO, KELIP) -----------------
PIXELS_VIEWS = "pixels_views"      # uint8 (V, 3, H, W): augmented image views, data.views.image
TOKENS_VIEWS = "tokens_views"      # int64 (V_t, L): augmented / derived texts, data.views.text
TOKEN_MASK_VIEWS = "token_mask_views"  # int64 (V_t, L)
MLM_TOKENS = "mlm_tokens"          # int64 (L,): TOKENS with data.views.mlm_prob of them masked
MLM_LABELS = "mlm_labels"          # int64 (L,): original id where masked, else -100 (ignored)
TEXT_PIXELS = "text_pixels"        # uint8 (3, H, W): the caption rendered as an image (CLIPPO)

# --- masks and regions for generative / alignment objectives (issue 7) -----------------------
PATCH_MASK = "patch_mask"          # bool (N_patches,): True = masked (MIM / MAE / MMM); added per
                                   # step by the objective (Objective.prepare), row-major grid
REGION_BOXES = "region_boxes"      # float32 (K, 4): (x0, y0, x1, y1) in [0, 1], zero-padded
REGION_SPANS = "region_spans"      # int64 (K, L): 1 on the caption tokens naming region k's phrase
REGION_MASK = "region_mask"        # int64 (K,): 1 where region k is real and its phrase was found
COMPLETION_TOKENS = "completion_tokens"  # int64 (L,): NLIP's generated caption, added per step
                                   # by nlip_completion's prepare (auxiliary text)
COMPLETION_MASK = "completion_mask"      # int64 (L,): 1 for its real tokens, 0 for padding
COMPLETION_CONCEPTS = "completion_concepts"  # int64 (k,): indices of the top-k concepts the
                                   # caption was conditioned on (nlip_completion)

# --- rewritten and synthetic captions (issue 4: La-CLIP, ALIP) --------------------------------
REWRITE_FALLBACKS = "rewrite_fallbacks"  # list<str>: per rewrite slot, "" = the LLM's rewrite
                                   # was kept, else why it fell back to the original caption
CAPTION_FALLBACK = "caption_fallback"    # str: "" = synthetic_caption is the captioner's, else
                                   # why it fell back to the original caption
TOKENS_AUG = "tokens_aug"          # int64 (T, L): TEXT then its rewrites (texts_aug), tokenised,
                                   # padded with all-zero rows to data.max_texts_aug slots
TOKEN_MASK_AUG = "token_mask_aug"  # int64 (T, L): 1 for real tokens; an all-zero row = empty slot
SYNTHETIC_TOKENS = "synthetic_tokens"      # int64 (L,): SYNTHETIC_CAPTION tokenised (ALIP)
SYNTHETIC_TOKEN_MASK = "synthetic_token_mask"  # int64 (L,)

# --- curation: provenance, signals, accounting ---------------------------------------------
URL = "url"                        # str: where the image was downloaded from (URL-list inputs)
SOURCE = "source"                  # str: the input file a row was read from
ROW_ID = "row_id"                  # int64: (input file index << 32) | row index; input order
LANE_POS = "lane_pos"              # int64: (item << 32) | position in a worker's lane (data.order)
WIDTH = "width"                    # int: image width after orientation fix, before re-encode
HEIGHT = "height"                  # int: image height after orientation fix, before re-encode
SHA256 = "sha256"                  # str: hex digest of the original image bytes (exact dedup)
PHASH = "phash"                    # int64: 64-bit perceptual (DCT) hash of the image
TEXT_SIG = "text_sig"              # str: normalised-caption signature (caption dedup)
CLIP_SCORE = "clip_score"          # float: image-text agreement (cosine) from a scoring model
REPAIRS = "repairs"                # str: ";"-joined repairs applied (e.g. "exif_rotated")
DUPLICATE_OF = "duplicate_of"      # str: key of the row a duplicate was judged a copy of

# --- accounting -------------------------------------------------------------------------------
REJECT_REASON = "reject_reason"    # str: "" for accepted rows, else why the row was dropped
REJECT_STAGE = "reject_stage"      # str: name of the stage that rejected the row ("" if kept)

# Webdataset member suffixes for the raw columns.
WDS_SUFFIX = {IMAGE: "jpg", TEXT: "txt", META: "json"}

__all__ = [
    "KEY", "IMAGE", "TEXT", "META", "TEXTS_AUG", "SYNTHETIC_CAPTION", "LABEL", "BOXES",
    "PHRASES", "NEIGHBOURS", "NEIGHBOUR_SCORES", "IMAGE_EMBED", "TEXT_EMBED", "REF_IMAGE_EMBEDS",
    "REF_TEXT_EMBEDS", "REF_MASK", "NN_TEXT", "NN_TOKENS", "NN_TOKEN_MASK", "PIXELS", "TOKENS",
    "TOKEN_MASK", "PIXELS_VIEWS", "TOKENS_VIEWS", "TOKEN_MASK_VIEWS", "MLM_TOKENS", "MLM_LABELS",
    "TEXT_PIXELS", "PATCH_MASK", "REGION_BOXES", "REGION_SPANS", "REGION_MASK",
    "COMPLETION_TOKENS", "COMPLETION_MASK", "COMPLETION_CONCEPTS", "REWRITE_FALLBACKS",
    "CAPTION_FALLBACK", "TOKENS_AUG", "TOKEN_MASK_AUG", "SYNTHETIC_TOKENS",
    "SYNTHETIC_TOKEN_MASK", "URL", "SOURCE", "ROW_ID", "LANE_POS",
    "WIDTH", "HEIGHT", "SHA256", "PHASH", "TEXT_SIG", "CLIP_SCORE", "REPAIRS", "DUPLICATE_OF",
    "REJECT_REASON", "REJECT_STAGE", "WDS_SUFFIX",
]
