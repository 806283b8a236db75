"""Evaluation: `python -m dvlx.eval vl` scores VL answers locally; `lmms_plugin` serves stock lmms-eval."""

from dvlx.eval.vl import GenerationSettings, VLRecord, evaluate, exact_match, match_choice, normalize_answer

__all__ = ["GenerationSettings", "VLRecord", "evaluate", "exact_match", "match_choice", "normalize_answer"]
