"""Caption rewriting backends (La-CLIP / ALIP); see the open issues."""
