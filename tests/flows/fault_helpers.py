"""Run in *other* processes by tests/flows/test_fault_tolerance.py: slows per-layer pruning down so a
test can kill a process in the middle of it, and leaves a marker file per layer started/finished.

    python tests/flows/fault_helpers.py run CONFIG [--output-dir DIR]    `prune`, with slow layers
    dask worker ... --preload tests/flows/fault_helpers.py               a Dask worker with slow layers

Settings come from the environment: PRUNING_TEST_LAYER_DELAY (seconds per layer) and
PRUNING_TEST_MARKERS (a directory; markers are ``<pid>--<layer>.start`` / ``.done``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def install_slow_layers() -> None:
    import flows.oneshot.tasks as tasks

    delay = float(os.environ.get("PRUNING_TEST_LAYER_DELAY", "0.5"))
    markers = os.environ.get("PRUNING_TEST_MARKERS")
    real = tasks.prune_one

    def slow_prune_one(*args, **kwargs):
        name = kwargs["name"]
        if markers:
            (Path(markers) / f"{os.getpid()}--{name}.start").touch()
        time.sleep(delay)
        result = real(*args, **kwargs)
        if markers:
            (Path(markers) / f"{os.getpid()}--{name}.done").touch()
        return result

    tasks.prune_one = slow_prune_one
    # Dask workers receive the task function pickled by value (the module attribute is the Prefect
    # Task, not the function); its global ``prune_one`` is then resolved through the module that
    # defines it, so patch that one too.
    setattr(sys.modules[real.__module__], real.__name__, slow_prune_one)


def dask_setup(worker) -> None:  # noqa: ARG001 - the Dask preload hook
    install_slow_layers()


if __name__ == "__main__":
    from flows.runtime import configure_environment

    configure_environment()
    install_slow_layers()
    from flows.cli import main

    raise SystemExit(main(sys.argv[1:]))
