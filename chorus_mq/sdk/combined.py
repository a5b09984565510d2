"""Both roles on one connection: what simulations, tests and an operator who also uploads use."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from .operator import OperatorSdk
from .participant import ParticipantSdk


class Sdk(OperatorSdk, ParticipantSdk):
    """The operator's and the participant's SDK on one connection."""

    @classmethod
    def embedded(
        cls, workdir: Path, *, redis_url: str | None = None, store_url: str | None = None, **settings: Any
    ) -> Self:
        """An SDK whose uploads run the real tasks in this process (fakeredis unless ``redis_url``; a ``file://``
        store under ``workdir`` unless ``store_url``); see :func:`chorus_mq.workers.inprocess.embedded_runtime`."""
        from ..workers.inprocess import embedded_runtime

        rt = embedded_runtime(workdir, redis_url=redis_url, store_url=store_url, **settings)
        return cls(rt.settings, redis=rt.redis, store=rt.store)
