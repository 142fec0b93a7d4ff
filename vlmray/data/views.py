"""Augmented views of each training row, made in Ray Data (DeCLIP, PyramidCLIP, CLIPPO).

``data.views`` lists what to add; a stage runs lazily over the materialised training rows, so
every epoch draws new views. The model never re-reads raw bytes: it encodes the extra columns
when an objective asks for them (``vlmray.models.outputs``).

    image views  -> schema.PIXELS_VIEWS     (V, 3, S, S)   "global" / "local" random crops
    text views   -> schema.TOKENS_VIEWS     (V_t, L)       "eda" / "summary" / "attributes"
    mlm_prob > 0 -> schema.MLM_TOKENS, schema.MLM_LABELS (L,)
    render_text  -> schema.TEXT_PIXELS      (3, S, S)      the caption drawn as an image
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_VIEW_KINDS = ("global", "local")
TEXT_VIEW_KINDS = ("eda", "summary", "attributes")


@dataclass(kw_only=True)
class ViewsConfig:
    image: list[str] = field(default_factory=list)
    """Augmented image views, in order (each one of ``global``: a random resized crop of
    scale [global_min_scale, 1] with flip and colour jitter; ``local``: a crop of scale
    [local_min_scale, local_max_scale], resized to the full side)."""
    global_min_scale: float = 0.4
    """Smallest area fraction of a ``global`` crop."""
    local_min_scale: float = 0.05
    """Smallest area fraction of a ``local`` crop."""
    local_max_scale: float = 0.4
    """Largest area fraction of a ``local`` crop."""
    text: list[str] = field(default_factory=list)
    """Derived texts, in order (each one of ``eda``: random word deletion/swap/repeat as EDA;
    ``summary``: the caption's first clause; ``attributes``: its content words)."""
    eda_prob: float = 0.1
    """Per-word probability of each EDA edit."""
    mlm_prob: float = 0.0
    """Fraction of caption tokens masked for masked language modelling (0: off; BERT: 0.15)."""
    render_text: bool = False
    """Draw each caption onto an image (``schema.TEXT_PIXELS``) for CLIPPO's shared tower."""
    seed: int = 0
    """Seed of the view randomness (mixed with each row's key and a per-stage counter)."""

    def __post_init__(self) -> None:
        for kind in self.image:
            if kind not in IMAGE_VIEW_KINDS:
                raise ValueError(f"data.views.image: {kind!r} is not one of "
                                 f"{list(IMAGE_VIEW_KINDS)}")
        for kind in self.text:
            if kind not in TEXT_VIEW_KINDS:
                raise ValueError(f"data.views.text: {kind!r} is not one of "
                                 f"{list(TEXT_VIEW_KINDS)}")
        if not 0.0 < self.global_min_scale <= 1.0:
            raise ValueError(f"data.views.global_min_scale must be in (0, 1], got "
                             f"{self.global_min_scale}")
        if not 0.0 < self.local_min_scale <= self.local_max_scale <= 1.0:
            raise ValueError("data.views: need 0 < local_min_scale <= local_max_scale <= 1, got "
                             f"{self.local_min_scale}, {self.local_max_scale}")
        for name in ("eda_prob", "mlm_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"data.views.{name} must be in [0, 1), got "
                                 f"{getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return bool(self.image or self.text or self.mlm_prob > 0 or self.render_text)

    @property
    def needs_text(self) -> bool:
        """Whether the stage reads the caption string (so training rows must keep it)."""
        return bool(self.text or self.render_text)


__all__ = ["IMAGE_VIEW_KINDS", "TEXT_VIEW_KINDS", "ViewsConfig"]
