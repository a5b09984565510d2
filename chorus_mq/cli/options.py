"""What every ``chorus-mq`` command shares: one-line errors with the exit-code scheme, settings and the SDK
from the main group's options, and the options several commands take (``--federation``, ``--json``,
``--balance-labels``), each defined once here."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import ChorusError, ServiceUnavailable
from ..names import LabelBalance
from ..settings import Settings

if TYPE_CHECKING:
    from ..client import ChorusClient

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
    from ..client import ChorusClient

    return ChorusClient(settings_of(ctx), secret=secret)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def choice(enum: Any) -> click.Choice[str]:
    """A click choice of an enum's values (``names.py`` spells them)."""
    return click.Choice(list(enum.values()))


def csv(value: str | None) -> tuple[str, ...] | None:
    """``"a, b,"`` -> ``("a", "b")``; None for an empty or absent value."""
    if not value:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def federation_option(help_text: str | None = None, *, required: bool = True) -> Callable[[F], F]:
    """``--federation/-f NAME``: the federation a command acts on."""
    return click.option("--federation", "-f", required=required, default=None, help=help_text)


def json_option(help_text: str | None = None) -> Callable[[F], F]:
    """``--json`` (the parameter ``as_json``): machine-readable output instead of text."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)


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
