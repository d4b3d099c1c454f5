"""Prefect deployment steps of deployments/prefect.yaml (run by the flow-run process, on the worker).

Kept free of heavy imports: a pull step runs before the flow's code is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

WORKDIR_ENV = "PRUNING_WORKDIR"


def project_dir(directory: str | None = None) -> Path:
    """The worker's copy of the project: ``$PRUNING_WORKDIR`` if set, else ``directory`` if given,
    else the source checkout this module was imported from (a clone or an editable install).

    Raises:
        RuntimeError: none of them names a directory holding ``flows/`` (e.g. the package is
            installed into site-packages and ``PRUNING_WORKDIR`` is not set).
    """
    chosen = os.environ.get(WORKDIR_ENV) or directory
    root = Path(chosen).expanduser() if chosen else Path(__file__).resolve().parents[1]
    if not (root / "flows").is_dir() or (chosen is None and not (root / "pyproject.toml").is_file()):
        source = f"${WORKDIR_ENV}" if os.environ.get(WORKDIR_ENV) else ("directory" if directory else "the checkout")
        raise RuntimeError(f"{root} (from {source}) is not the pruning project's directory (no flows/ in it); "
                           f"set {WORKDIR_ENV} in the worker's environment to the directory holding flows/")
    return root


def set_working_directory(directory: str | None = None) -> dict[str, str]:
    """Pull step of the process-pool deployments: run the flow from the worker's copy of the project.

    Resolved on the worker when the flow run starts (:func:`project_dir`), not baked in when the
    deployment is created: deploying from a laptop works for a worker in the compose stack
    (``PRUNING_WORKDIR=/opt/pruning``) and for one started from a checkout alike.

    Returns:
        ``{"directory": <the new working directory>}``, as Prefect's own step does.
    """
    os.chdir(project_dir(directory))
    return {"directory": os.getcwd()}
