"""Contrastive objectives: CLIP's InfoNCE and its relatives. Importing registers them."""

from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.declip_mv import DeclipMVLoss
from vlmray.objectives.contrastive.declip_nns import DeclipNNSLoss
from vlmray.objectives.contrastive.filip import FilipLoss
from vlmray.objectives.contrastive.multicrop_clip import MultiCropClipLoss
from vlmray.objectives.contrastive.nlip import NlipLoss
from vlmray.objectives.contrastive.oner import OneRLoss
from vlmray.objectives.contrastive.otter import OtterLoss
from vlmray.objectives.contrastive.pyramidclip import PyramidClipLoss
from vlmray.objectives.contrastive.siglip import SigLipLoss
from vlmray.objectives.contrastive.simsiam import SimSiamLoss
from vlmray.objectives.contrastive.unicl import UniClLoss

__all__ = ["ClipLoss", "OneRLoss", "DeclipMVLoss", "SimSiamLoss", "DeclipNNSLoss", "FilipLoss",
           "MultiCropClipLoss", "NlipLoss", "OtterLoss", "PyramidClipLoss", "SigLipLoss",
           "UniClLoss"]

from vlmray.objectives.contrastive.alip import AlipLoss  # noqa: E402, F401
from vlmray.objectives.contrastive.nlip_completion import NlipCompletionLoss  # noqa: E402, F401
