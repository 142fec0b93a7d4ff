"""The error every bad setting raises, and the message that names the valid choices."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A bad config: raised before any work starts, naming the valid choices."""


def unknown_message(kind: str, name: str, valid: list[str], limit: int = 40) -> str:
    """``unknown objective 'clp'; did you mean 'clip'? valid: clip, siglip``."""
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(valid[:limit]) + (f", ... ({len(valid)} in all)" if len(valid) > limit else "")
    return f"unknown {kind} {name!r}{hint} valid: {shown}"


__all__ = ["ConfigError", "unknown_message"]
