"""Generative objectives: masked image / language / multimodal modelling, captioning and prefix
generation through decoders the objectives own. Importing registers them."""
# registers caption, pali, multicrop_clip, mim, mmm
from vlmray.objectives.generative import caption, kelip, mim, mmm, pali  # noqa: F401
