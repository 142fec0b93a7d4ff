"""Contrastive objectives: CLIP's InfoNCE and its relatives. Importing registers them."""

from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.declip_nns import DeclipNNSLoss
from vlmray.objectives.contrastive.filip import FilipLoss
from vlmray.objectives.contrastive.siglip import SigLipLoss
from vlmray.objectives.contrastive.unicl import UniClLoss

__all__ = ["ClipLoss", "DeclipNNSLoss", "FilipLoss", "SigLipLoss", "UniClLoss"]
