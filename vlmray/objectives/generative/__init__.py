"""Generative objectives: masked image / language / multimodal modelling, captioning and prefix
generation through decoders the objectives own. Importing registers them."""
# registers caption, pali, mim, mlm, mmm
from vlmray.objectives.generative import caption, mim, mlm, mmm, pali  # noqa: F401
