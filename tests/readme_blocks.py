"""The README's "Running on a cluster" deployment commands, as the tests run and check them
(tests/flows/test_deployments.py offline, tests/stack/test_stack.py against the local stack)."""

from __future__ import annotations

import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def deployment_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The ``bash`` block of the README's **Deployments** item, one argv per command line."""
    text = readme.read_text()
    section = text[text.index("## Running on a cluster"):]
    item = section[section.index("- **Deployments.**"):]
    block = item[item.index("```bash") + len("```bash"):]
    block = block[: block.index("```")]
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def setup_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The commands up to and including ``prefect deploy`` (work pools, then the deployments);
    what follows (a worker, a run) needs a worker of its own."""
    commands = deployment_commands(readme)
    last = next(i for i, argv in enumerate(commands) if "deploy" in argv)
    return commands[: last + 1]
