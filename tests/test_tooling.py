"""The pre-commit hooks run what CI checks: the same commands as .ci/run's lint and type steps."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("ruff", "mypy")


def _ci_checks() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [" ".join(shlex.split(line)) for line in lines if line.split(" ", 1)[0] in CHECKS]


def test_pre_commit_runs_what_ci_checks():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert {repo["repo"] for repo in config["repos"]} == {"local"}  # the tools install.sh pinned
    assert all(hook["language"] == "system" and hook["pass_filenames"] is False for hook in hooks)
    assert [" ".join(shlex.split(hook["entry"])) for hook in hooks] == _ci_checks()
    assert _ci_checks() == ["ruff check .", "ruff format --check .", "mypy"]


def test_the_hooks_tools_are_the_pinned_ones():
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    extras = (ROOT / "pyproject.toml").read_text()
    header = (ROOT / ".pre-commit-config.yaml").read_text().split("repos:", 1)[0]
    for tool in CHECKS:
        assert f'"{tool}=={pins[tool]}"' in extras  # the test extra installs exactly the constrained version
        assert f"{tool} {pins[tool]}" in header  # and the config says which one it runs
