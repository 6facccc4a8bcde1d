"""The eight MedVidBench tasks: canonical short names and `normalize_task` for the many `qa_type` spellings.

Canonical names (spec docs/methods/medgrpo.md §2): tal (temporal action localisation / grounding, "TAG"), stg
(spatio-temporal
grounding), dvc (dense video captioning), vs (video summary), rc (region caption), nap (next action prediction),
sa (skill assessment), cvs (critical view of safety).
"""

from __future__ import annotations

import re
from typing import Literal

Task = Literal["tal", "stg", "dvc", "vs", "rc", "nap", "sa", "cvs"]

TASKS: tuple[Task, ...] = ("tal", "stg", "dvc", "vs", "rc", "nap", "sa", "cvs")

# Tasks whose RL reward is format_ok x IoU, whose reward is the hybrid caption score, and classification tasks.
LOCALIZATION_TASKS: tuple[Task, ...] = ("tal", "stg")
CAPTION_TASKS: tuple[Task, ...] = ("vs", "rc")
CLASSIFICATION_TASKS: tuple[Task, ...] = ("nap", "sa", "cvs")

_ALIASES: dict[str, Task] = {
    "tal": "tal",
    "tag": "tal",
    "temporal_action_localization": "tal",
    "temporal_action_localisation": "tal",
    "temporal_grounding": "tal",
    "stg": "stg",
    "spatial_temporal_grounding": "stg",
    "spatiotemporal_grounding": "stg",
    "spatio_temporal_grounding": "stg",
    "dvc": "dvc",
    "dense_captioning": "dvc",
    "dense_video_captioning": "dvc",
    "vs": "vs",
    "video_summary": "vs",
    "video_summarization": "vs",
    "rc": "rc",
    "region_caption": "rc",
    "region_captioning": "rc",
    "nap": "nap",
    "next_action": "nap",
    "next_action_prediction": "nap",
    "sa": "sa",
    "skill_assessment": "sa",
    "cvs": "cvs",
    "cvs_assessment": "cvs",
}

# Generator suffixes of the dual-generated tasks (GPT-4.1 / Gemini-2.5-Flash) and evaluator variants.
_SUFFIX = re.compile(r"_(gpt|gemini|gpt4|gpt41|gemini25|llm_judge|judge)$")


def normalize_task(qa_type: str) -> Task:
    """The canonical task name of a MedVidBench `qa_type` (e.g. "dense_captioning_gpt" -> "dvc").

    Case, surrounding spaces, '-'/' ' separators and the `_gpt` / `_gemini` generator suffixes are ignored.

    Raises:
        ValueError: naming the unknown value and the canonical names.
    """
    if not isinstance(qa_type, str):
        raise ValueError(f"qa_type must be a string, got {qa_type!r}; allowed tasks: {list(TASKS)}")
    key = re.sub(r"[\s\-]+", "_", qa_type.strip().lower())
    if key in _ALIASES:
        return _ALIASES[key]
    stripped = _SUFFIX.sub("", key)
    if stripped in _ALIASES:
        return _ALIASES[stripped]
    raise ValueError(
        f"unknown MedVidBench task {qa_type!r}; allowed: {list(TASKS)} or a qa_type such as "
        "'dense_captioning_gpt', 'video_summary_gemini', 'region_caption_gpt', 'next_action', "
        "'skill_assessment', 'cvs_assessment'"
    )
