"""The ``chorus-mq`` command line: a thin layer over :class:`chorus_mq.client.ChorusClient`, a module per
command group (``services``, ``federation``, ``clients``, ``transfer``, ``rounds``, ``simulate``, ``train``);
the options they share are defined once in ``options``.

Exit codes (one scheme, from ``chorus_mq.errors``): 0 ok, 1 other error, 2 bad configuration or
arguments, 3 invalid adapter, 4 not found, 5 conflict, 6 rejected by the workers, 7 not
authorised, 8 a service is unavailable (retrying is safe), 9 timed out, 10 the round failed.
Read-only commands import no torch.
"""

from __future__ import annotations

import click

from .clients import acl_group, client_group
from .federation import federation
from .rounds import compact, round_group, rounds, status, watch
from .services import beat, redis_gateway, worker
from .simulate import simulate
from .train import export, train
from .transfer import pull, upload

__all__ = ["main"]


@click.group()
@click.option(
    "--redis-url",
    envvar="CHORUS_REDIS_URL",
    default=None,
    help="Redis for state, events and the inbox (a client's URL comes from `client add`).",
)
@click.option("--store", envvar="CHORUS_STORE", default=None, help="s3://bucket/prefix or file:///path")
@click.version_option(package_name="chorus-mq")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, store: str | None) -> None:
    """Exact federated LoRA fine-tuning over Redis, Celery and S3."""
    ctx.obj = {"redis_url": redis_url, "store": store}


for _command in (
    worker,
    beat,
    redis_gateway,
    federation,
    client_group,
    acl_group,
    upload,
    pull,
    status,
    watch,
    rounds,
    round_group,
    compact,
    simulate,
    train,
    export,
):
    main.add_command(_command)
