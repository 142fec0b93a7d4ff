"""Contrastive objectives: CLIP's InfoNCE and its relatives. Importing registers them."""

from vlmray.objectives.contrastive.clip import ClipLoss

__all__ = ["ClipLoss"]
