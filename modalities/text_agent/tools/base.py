"""The tool protocol of the tool-loop sampler: a named, batched text-in/text-out callable, and `ToolError`.

The model writes `<{name}>query</{name}>`; the sampler collects the queries of all rows that called
the tool in one turn, calls the tool once with the batch, and wraps each observation as
`<information>...</information>`. A tool raises `ToolError` when the call as a whole failed (server
down, index missing); the sampler turns that into a failure observation and counts it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class ToolError(RuntimeError):
    """A tool call failed as a whole (after the tool's own retries); the message says why and where."""


@runtime_checkable
class Tool(Protocol):
    """A batched tool: one observation string per query, in order.

    Attributes:
        name: the action tag, e.g. "search" for `<search>query</search>`.
    """

    name: str

    def __call__(self, queries: list[str]) -> list[str]: ...
