"""How the `server` engine keeps a server's weights current, from one trainer process or many: one push per version.

The rules that keep it collective-safe (every rank runs the same collectives in the same order):
1. A new version is pushed at each rank's first `generate` after the policy's weights changed. Weights change on
   every rank together (an optimizer step, a checkpoint load) and every rank samples after each change, so every
   rank arrives; the later calls of that step (tool-loop turns, refills) see no change and never communicate.
2. Gathered once: sharded (FSDP2) weights are all-gathered on every rank (`policy_weights`); inside the trainer's
   `gathered_weights` they are already whole and nothing is gathered. Rank 0 alone encodes and sends them.
3. Agreed: rank 0 broadcasts the outcome, the new version or why the push failed, and every rank adopts it: all
   completion requests name the same version, or every rank raises the same error. A retryable failure is
   retried by every rank's retry loop in step (each attempt pushes again, collectively), then fails alike.
4. Repaired alone: a server that lost the version (a restart: 409 from serve-policy, 404 for a vLLM adapter) is
   sent that same version again by the rank that saw it, with no collective (the others may be anywhere in their
   step). The same version means the same weights on every rank, so repairs by one rank or by several leave the
   server in one state. Under FSDP that needs the whole weights, as inside `gathered_weights` where the trainer
   samples; a rank holding only shards cannot repair alone and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

from toolkit import distributed as dist
from toolkit.engines.base import weights_key
from toolkit.engines.weights import (
    VERSION_FIELD,
    TransferDtype,
    WeightsKind,
    encode_weights,
    has_sharded_weights,
    policy_weights,
    weights_kind,
)
from toolkit.interfaces import Policy

log = logging.getLogger(__name__)
Post = Callable[[str, bytes, dict[str, str]], dict[str, Any]]
Weights = tuple[dict[str, Tensor], WeightsKind]


class WeightTransport(Protocol):
    """How one kind of server takes a weights version (serve-policy's `/v1/weights`, vLLM's LoRA adapters)."""

    kinds: tuple[WeightsKind, ...]  # what it can serve

    def send(self, version: str, weights: Weights, policy: Policy) -> None:
        """Make the server serve `weights` as the new `version` (rank 0 alone)."""
        ...

    def resend(self, version: str, read_weights: Callable[[], Weights]) -> None:
        """Make the server serve `version` again after it lost it; `read_weights()` reads this rank's whole copy."""
        ...

    def model_name(self, version: str | None) -> str | None:
        """The model name a completions request sends while `version` is served; None: the engine's own."""
        ...

    def expects(self, version: str | None) -> str | None:
        """The version a completions request names (the server answers 409 for another); None: not checked."""
        ...


class RenormPush:
    """serve-policy's channel: the safetensors payload to `POST /v1/weights`, answered with its version."""

    kinds: tuple[WeightsKind, ...] = ("full", "lora")

    def __init__(self, post: Post, headers: dict[str, str]) -> None:
        self._post = post
        self._headers = {**headers, "Content-Type": "application/octet-stream"}

    def send(self, version: str, weights: Weights, policy: Policy) -> None:
        self._deliver(version, weights)

    def resend(self, version: str, read_weights: Callable[[], Weights]) -> None:
        self._deliver(version, read_weights())

    def _deliver(self, version: str, weights: Weights) -> None:
        tensors, kind = weights
        answer = self._post("/weights", encode_weights(tensors, version, kind), self._headers)
        if answer.get(VERSION_FIELD) != version:
            raise ValueError(f"the server answered a weight push with {answer!r:.200}, not version {version}")

    def model_name(self, version: str | None) -> str | None:
        return None

    def expects(self, version: str | None) -> str | None:
        return version


class WeightChannel:
    """The weights version a server serves for one engine, kept current by `sync` (see the module's rules).

    Attributes:
        version: the version every completion request of this engine assumes (None before the first push).
        num_versions: versions synced so far (the same on every rank).
        num_pushes: payloads this rank sent: new versions (rank 0) and repairs (any rank).
    """

    def __init__(
        self, transport: WeightTransport, dtype: TransferDtype, session: str, retryable: type[Exception]
    ) -> None:
        self.transport, self.dtype, self.session, self.retryable = transport, dtype, session, retryable
        self.version: str | None = None
        self.num_versions = 0
        self.num_pushes = 0
        self._synced: tuple[int, int] | None = None  # the policy's weights key at the last sync
        self._lost = False

    def sync(self, policy: Policy) -> bool:
        """Push the policy's weights when they changed since the last sync (True), or repair a lost version."""
        local = weights_key(policy.module)
        if local != self._synced:
            self._push(policy, local)
            return True
        if self._lost:
            self._repair(policy)
        return False

    def mark_lost(self) -> None:
        """The server no longer serves `version` (it restarted): the next `sync` sends it again from this rank."""
        self._lost = True

    def _push(self, policy: Policy, local: tuple[int, int]) -> None:
        kind = weights_kind(policy)
        if kind not in self.transport.kinds:
            raise ValueError(
                f"{type(self.transport).__name__} serves {list(self.transport.kinds)} weights only, but this policy "
                f"trains {kind} weights (a stock `vllm serve` takes no full weights over HTTP: use `renorm "
                "serve-policy` with weight_sync 'push', or the colocated `vllm` engine)"
            )
        version = f"{self.session}-{self.num_versions + 1}"  # rank 0's is the one every rank adopts
        main = dist.rank() == 0
        weights = policy_weights(policy, self.dtype, keep=main)  # a collective where the weights are sharded
        if dist.world_size() == 1:
            self.transport.send(version, weights, policy)  # errors propagate as they are
        else:
            status, detail = dist.broadcast_object(self._send(version, weights, policy) if main else None)
            if status != "ok":
                raise self._agreed_error(status, detail)
            version = detail
        self.version, self._synced, self._lost = version, local, False
        self.num_versions += 1
        self.num_pushes += int(main)

    def _send(self, version: str, weights: Weights, policy: Policy) -> tuple[str, str]:
        """("ok", version) or (failure kind, message): what rank 0 broadcasts, so that no rank waits forever."""
        try:
            self.transport.send(version, weights, policy)
        except self.retryable as error:
            return "retry", str(error)
        except ValueError as error:
            return "refused", str(error)
        except Exception as error:  # anything else rank 0 hit must still reach the other ranks
            return "failed", f"{type(error).__name__}: {error}"
        return "ok", version

    def _agreed_error(self, status: str, detail: str) -> Exception:
        message = f"the weight push (sent by rank 0 for all {dist.world_size()} ranks) failed: {detail}"
        if status == "retry":
            return self.retryable(message)
        return ValueError(message) if status == "refused" else RuntimeError(message)

    def _repair(self, policy: Policy) -> None:
        version = self.version
        assert version is not None  # only a served version can be lost

        def read_weights() -> Weights:
            if has_sharded_weights(policy):
                raise ValueError(
                    f"the server lost weights version {version} and rank {dist.rank()} holds only shards of them "
                    "(FSDP outside gathered weights): one rank cannot send them again alone. Sample inside "
                    "toolkit.train.sharding.gathered_weights, as the trainer does"
                )
            return policy_weights(policy, self.dtype)

        log.warning("the server lost weights version %s: rank %d sends it again", version, dist.rank())
        self.transport.resend(version, read_weights)
        self._lost = False
        self.num_pushes += 1
