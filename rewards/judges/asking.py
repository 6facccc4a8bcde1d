"""The judges' shared request loop: ask every conversation, parse the replies, re-ask the unparsable ones.

Re-asks are bounded and counted; a re-ask may show the bad reply with a format reminder (useful at
temperature 0, where the same prompt yields the same reply). Also the helpers every judge uses to accept
a client (a JudgeClient or a config mapping) and to read its stats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rewards.judges.client import ClientStats, Conversation, HFChatClient, JudgeClient, OpenAIChatClient

Value = TypeVar("Value")


@dataclass
class Asked(Generic[Value]):
    """Result of `ask_until_valid`.

    Attributes:
        values: per prompt the parsed value of its last reply, None = still invalid or failed.
        replies: per prompt the last raw reply (None = the request failed).
        reasks: conversations sent again after the first round.
    """

    values: list[Value | None]
    replies: list[str | None]
    reasks: int


def with_feedback(prompt: Conversation, reply: str, reminder: str) -> list[Any]:
    """`prompt` followed by the judge's bad `reply` and a user turn with the format `reminder`."""
    return [*prompt, {"role": "assistant", "content": reply}, {"role": "user", "content": reminder}]


def ask_until_valid(
    client: JudgeClient,
    prompts: Sequence[Conversation],
    parse: Callable[[int, str | None], Value | None],
    max_asks: int,
    reminder: Callable[[int], str] | None = None,
    reask_failed: bool = False,
    before_reask: Callable[[int], None] | None = None,
) -> Asked[Value]:
    """Ask all `prompts` in one batch, then re-ask those whose reply `parse(index, reply)` rejects.

    Args:
        client: the judge client; it must return one reply per conversation.
        prompts: one conversation per item.
        parse: (item index, reply) -> value, None when the reply is invalid.
        max_asks: rounds at most (1 = no re-ask).
        reminder: item index -> format reminder shown after the bad reply; None re-sends the prompt as is.
            A failed request (reply None) is always re-sent as is.
        reask_failed: also re-ask items whose request failed (False: the client already retried them).
        before_reask: called with the round number (1, 2, ...) before each re-ask round (e.g. back-off).
    """
    values: list[Value | None] = [None] * len(prompts)
    replies: list[str | None] = [None] * len(prompts)
    pending, reasks = list(range(len(prompts))), 0
    for attempt in range(max_asks):
        if not pending:
            break
        if attempt:
            reasks += len(pending)
            if before_reask is not None:
                before_reask(attempt)
        batch: list[Conversation] = [_conversation(prompts[j], replies[j], j, reminder) for j in pending]
        answers = client.complete(batch)
        if len(answers) != len(batch):
            raise RuntimeError(f"judge client returned {len(answers)} replies for {len(batch)} conversations")
        retry = []
        for j, answer in zip(pending, answers, strict=True):
            replies[j] = answer
            values[j] = parse(j, answer)
            if values[j] is None and (answer is not None or reask_failed):
                retry.append(j)
        pending = retry
    return Asked(values, replies, reasks)


def _conversation(
    prompt: Conversation, reply: str | None, index: int, reminder: Callable[[int], str] | None
) -> Conversation:
    if reply is None or reminder is None:
        return prompt
    return with_feedback(prompt, reply, reminder(index))


def check_client(client: Any) -> None:
    """ValueError unless `client` has a `complete(batch)` method."""
    if not callable(getattr(client, "complete", None)):
        raise ValueError(f"client {type(client).__name__} has no complete(batch) method")


def client_from_config(client: Any) -> Any:
    """A mapping becomes OpenAIChatClient (has base_url) or HFChatClient (has model); anything else is returned."""
    if not isinstance(client, Mapping):
        return client
    if "base_url" in client:
        return OpenAIChatClient(**client)
    if "model" in client:
        return HFChatClient(**client)
    raise ValueError(f"judge client config needs base_url (HTTP) or model (local), got {sorted(client)}")


def stats_snapshot(client: Any) -> ClientStats:
    """A copy of the client's `stats` now (zeros for a client without ClientStats)."""
    stats = getattr(client, "stats", None)
    return stats.snapshot() if isinstance(stats, ClientStats) else ClientStats()
