"""Generative objectives: masked image / language / multimodal modelling, captioning and prefix
generation through decoders the objectives own. Importing registers them."""
