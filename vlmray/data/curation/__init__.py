"""Curation of noisy web image-text pairs: stages, whole-dataset decisions, accounting.

Row-level stages (:mod:`.text`, :mod:`.images`, :mod:`.download`, :mod:`.score`) follow the
contract in :mod:`.stage`; whole-dataset decisions (:mod:`.dedup`, keep-top-fraction) return
:class:`~.stage.Decisions`. ``vlmray.pipelines.curate`` composes them into a Ray Data plan.
"""
