"""The Python SDK as one class. The CLI is a thin layer over it; ``simulate`` and ``train`` drive it too.

A client talks to Redis (its federation's public state and events, and its inbox: a
data-only stream it may only append to) and to object storage (its own upload prefix, and
the round results it pulls). Operators use the same class with operator credentials to
create federations and manage clients. Read-only paths import no torch.

:class:`ChorusClient` is both roles of :mod:`chorus_mq.sdk` (``OperatorSdk``, ``ParticipantSdk``) with the
training entry points of :mod:`chorus_mq.training` on top; code that needs one role can take that role's class.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RoundFailed
from .sdk.combined import Sdk
from .sdk.summaries import ClientCredentials, RoundSummary, Status, UploadResult

if TYPE_CHECKING:
    from peft import PeftModel

    from .training.records import RoundRecord


class ChorusClient(Sdk):
    """Talk to a chorus-mq deployment: Redis for state, events and the inbox; object storage for tensors."""

    def train(self, **options: Any) -> Iterator[RoundRecord]:
        """Run the federation from this client's side: ``options`` are a ``chorus_mq.training.driver.TrainJob``'s
        fields (see :func:`chorus_mq.training.driver.train_federation`)."""
        from .training.driver import train_federation

        return train_federation(self, **options)

    def global_model(
        self,
        federation: str,
        model_dir: str | Path,
        round_: int | None = None,
        *,
        workdir: str | Path | None = None,
        trainable: bool = False,
    ) -> PeftModel:
        """The exact global model of a round (see :func:`chorus_mq.training.model.global_model`)."""
        from .training.model import global_model

        return global_model(self, federation, model_dir, round_, workdir=workdir, trainable=trainable)


__all__ = ["ChorusClient", "ClientCredentials", "RoundFailed", "RoundSummary", "Status", "UploadResult"]
