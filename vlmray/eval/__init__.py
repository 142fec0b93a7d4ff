"""Evaluation: zero-shot classification and image<->text retrieval on a held-out split."""

from vlmray.eval.evaluate import evaluate
from vlmray.eval.heldout import HeldOut, load_heldout
from vlmray.eval.metrics import recall_at_k, topk_accuracy
from vlmray.eval.sources import EvalSourceError, check_eval_source

__all__ = ["EvalSourceError", "HeldOut", "check_eval_source", "evaluate", "load_heldout",
           "recall_at_k", "topk_accuracy"]
