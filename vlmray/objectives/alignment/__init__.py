"""Alignment objectives that score image-text pairs through a fusion encoder (ITM).
Importing registers them."""

from vlmray.objectives.alignment.itm import ItmLoss

__all__ = ["ItmLoss"]

from vlmray.objectives.alignment.regionword import RegionWordLoss  # noqa: E402

__all__ += ["RegionWordLoss"]
