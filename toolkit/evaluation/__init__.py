"""Evaluation outside training: `renorm eval` (`evaluate`) and `renorm score` (`score_file`)."""

from toolkit.evaluation.evaluate import EvalConfig, EvalReport, EvalResult, aggregate, evaluate, row_data
from toolkit.evaluation.score import load_reward, score_file

__all__ = ["EvalConfig", "EvalReport", "EvalResult", "aggregate", "evaluate", "load_reward", "row_data", "score_file"]
