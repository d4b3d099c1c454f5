"""A job's ``model`` (and ``revision``) resolved to a model directory, the local Hugging Face cache included.

``model`` is ``smollm2`` (the shipped SmolLM2-135M), a directory, or a hub id ``org/name``. A hub
id is looked up in the local hub cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``) the way
``huggingface_hub`` lays it out::

    models--org--name/refs/<ref name>       the commit a branch or tag points at (``main``, ...)
    models--org--name/snapshots/<commit>/   the files of that commit

``revision`` (default ``main``) is a ref name or a commit hash. Nothing downloads
(``HF_HUB_OFFLINE=1``): a model or revision that is not in the cache is a :class:`ConfigError`
naming the model, the revision and the revisions that are there, raised by ``prune validate``
before any work.

Imports neither Prefect nor MLflow (``prune validate`` stays light).
"""

from __future__ import annotations

import re
from pathlib import Path

from pruning_core.errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_REVISION = "main"


def hub_cache() -> Path:
    """The local hub cache ``huggingface_hub`` reads (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache(model: str) -> Path:
    """The cache folder of hub model ``org/name`` (``models--org--name``; it may not exist)."""
    return hub_cache() / ("models--" + model.replace("/", "--"))


def cached_revisions(repo: Path) -> dict[str, str]:
    """Every revision of a cached repository folder: ``{ref name or commit: commit}``, refs first.

    A ref whose snapshot is missing is left out (an interrupted download)."""
    snapshots = repo / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    refs = {}
    if (repo / "refs").is_dir():
        for ref in sorted(p for p in (repo / "refs").rglob("*") if p.is_file()):
            commit = ref.read_text(encoding="utf-8", errors="replace").strip()
            if commit in commits:
                refs[ref.relative_to(repo / "refs").as_posix()] = commit
    return {**refs, **{c: c for c in commits}}


def _describe(revisions: dict[str, str]) -> str:
    return ", ".join(name if name == commit else f"{name} ({commit})" for name, commit in revisions.items())


def resolve_hub_model(model: str, revision: str | None = None) -> Path:
    """The snapshot directory of hub id ``model`` at ``revision`` (a ref name or a commit; default
    ``main``) in the local hub cache.

    Raises:
        ConfigError: ``model`` is not in the cache (field ``model``), or ``revision`` is not
            (field ``revision``; names the revisions that are).
    """
    repo, wanted = repo_cache(model), revision or DEFAULT_REVISION
    revisions = cached_revisions(repo)
    if not revisions:
        raise ConfigError("model", f"{model!r} is neither a directory nor a Hugging Face model in the local hub "
                          f"cache {hub_cache()} (nothing downloads; fetch it first, e.g. `hf download {model}`)")
    commit = revisions.get(wanted)
    if commit is None:
        raise ConfigError("revision", f"{model!r} has no revision {wanted!r} in the local hub cache {hub_cache()}; "
                          f"cached revisions: {_describe(revisions)} (fetch it with `hf download {model} "
                          f"--revision {wanted}`)")
    return (repo / "snapshots" / commit).resolve()


def resolve_model(model: str, revision: str | None = None) -> Path:
    """The model directory a job's ``model`` names: a path as given (absolute), or a hub id's
    cached snapshot (:func:`resolve_hub_model`); ``smollm2`` is resolved by the caller.

    Raises:
        ConfigError: a ``revision`` for a local directory, or a hub id / revision not in the cache.
    """
    path = Path(model)
    if path.exists() or not HUB_ID.fullmatch(model):
        if revision is not None:
            raise ConfigError("revision", f"{model!r} is a local path; revision pins a Hugging Face hub id's "
                              "snapshot (model: org/name)")
        return path.resolve()
    return resolve_hub_model(model, revision)


__all__ = ["DEFAULT_REVISION", "HUB_ID", "cached_revisions", "hub_cache", "repo_cache", "resolve_hub_model",
           "resolve_model"]
