"""One instance of the cluster: its link to Redis, its claims and its cancels
forwarded to and from other instances (docs/scaling.md)."""

from __future__ import annotations

import anyio

from .cancels import Cancels, LocalCancel
from .claims import Claims

__all__ = ["Cluster"]


class Cluster(Cancels, Claims):
    async def run(
        self,
        local_cancel: LocalCancel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the link alive until ``stop``; ``local_cancel`` answers the cancels
        forwarded here."""
        self._local_cancel = local_cancel
        await self._run_link(task_status)
