"""LLM/VLM judges as reward models, behind one client interface (HTTP endpoint, local HF model or a fake)."""

from rewards.judges.client import (
    ClientStats,
    Conversation,
    FakeJudgeClient,
    HFChatClient,
    JudgeClient,
    Message,
    OpenAIChatClient,
)
from rewards.judges.ppr import (
    DEFAULT_PRINCIPLES,
    JudgedTurns,
    PrincipleProcessJudge,
    build_system_prompt,
    build_turn_messages,
    parse_final_score,
    split_trajectory,
)

__all__ = [
    "DEFAULT_PRINCIPLES",
    "ClientStats",
    "Conversation",
    "FakeJudgeClient",
    "HFChatClient",
    "JudgeClient",
    "JudgedTurns",
    "Message",
    "OpenAIChatClient",
    "PrincipleProcessJudge",
    "build_system_prompt",
    "build_turn_messages",
    "parse_final_score",
    "split_trajectory",
]
