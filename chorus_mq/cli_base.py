"""What every ``chorus-mq`` command shares: one-line errors with the exit-code scheme, settings from the
group's options. Kept apart from ``cli.py`` so the training commands can use it without a cycle."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .errors import ChorusError, ServiceUnavailable
from .names import LabelBalance
from .settings import Settings

if TYPE_CHECKING:
    from .client import ChorusClient

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """ChorusError -> one line on stderr and its exit code; a service failure -> one line saying a retry is
    safe (exit 8). Never a traceback for those."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ChorusError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # services down, a refused credential: still one line
            if type(exc).__module__.startswith(("redis", "botocore", "boto3", "kombu")):
                click.echo(f"error: {type(exc).__name__}: {exc} (retrying is safe)", err=True)
                sys.exit(ServiceUnavailable.exit_code)
            raise

    return wrapper  # type: ignore[return-value]


def settings_of(ctx: click.Context) -> Settings:
    """The environment's settings with the main group's ``--redis-url`` / ``--store`` applied."""
    root = ctx.find_root().obj
    overrides = {k: v for k, v in root.items() if v is not None} if isinstance(root, dict) else {}
    return Settings(**overrides)


def client_of(ctx: click.Context, secret: str | None = None) -> ChorusClient:
    from .client import ChorusClient

    return ChorusClient(settings_of(ctx), secret=secret)


def balance_labels_option(help_text: str) -> Callable[[F], F]:
    """``--balance-labels auto|on|off`` (a bare flag means on), shared by ``train`` and ``simulate``."""
    return click.option(
        "--balance-labels",
        type=click.Choice(LabelBalance.values()),
        default=LabelBalance.AUTO.value,
        show_default=True,
        is_flag=False,
        flag_value=LabelBalance.ON.value,
        help=help_text,
    )
