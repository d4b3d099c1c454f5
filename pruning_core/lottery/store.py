"""Persistence of Lottery Ticket state: safetensors + JSON, written atomically, no pickle.

Stage: lottery (its I/O edge). ``ticket.safetensors`` holds the tensors under the keys
``mask/<name>`` (bool), ``rewind/<name>`` and ``trained/<name>``; ``ticket.json`` holds the round
records, the config, the parameter names and the sha256 of the tensor file. The JSON is written
last, so a directory without it is an interrupted save and is ignored by :class:`TicketStore`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pruning_core.errors import ArtifactError, ConfigError, NumericalInstability
from pruning_core.io.atomic import atomic_path, atomic_write_text, sha256_file
from pruning_core.lottery import paths
from pruning_core.lottery.ticket import RoundRecord, WinningTicket
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)

FORMAT = "pruning_core.lottery.WinningTicket"
VERSION = 1
_GROUPS = ("mask", "rewind", "trained")


def _tensors(ticket: WinningTicket) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for group, tensors in zip(
        _GROUPS, (ticket.masks, ticket.rewind_weights, ticket.trained_weights), strict=True
    ):
        for name, t in tensors.items():
            out[f"{group}/{name}"] = t.detach().to("cpu").contiguous().clone()
    return out


def save_ticket(ticket: WinningTicket, directory: str | os.PathLike[str]) -> Path:
    """Write ``ticket`` into ``directory`` (created if needed); returns the directory."""
    d = Path(directory)
    with atomic_path(paths.tensors_file(d)) as tmp:
        save_file(_tensors(ticket), str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "round": ticket.round,
        "rewind_step": ticket.rewind_step,
        "config": ticket.config,
        "config_hash": ticket.config_hash,
        "names": {
            g: list(t)
            for g, t in zip(
                _GROUPS, (ticket.masks, ticket.rewind_weights, ticket.trained_weights), strict=True
            )
        },
        "records": [r.to_dict() for r in ticket.records],
        "density": ticket.density,
        "tensors_file": paths.TENSORS_FILE,
        "tensors_sha256": sha256_file(paths.tensors_file(d)),
    }
    atomic_write_text(paths.meta_file(d), json.dumps(meta, indent=1, sort_keys=True))
    logger.info("saved ticket of round %d (density %.4f) to %s", ticket.round, ticket.density, d)
    return d


def _read_meta(d: Path) -> dict[str, Any]:
    try:
        meta = json.loads(paths.meta_file(d).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(
            str(paths.meta_file(d)), "no ticket metadata (missing or interrupted save)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(str(paths.meta_file(d)), f"unreadable ticket metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(
            str(paths.meta_file(d)), f"ticket metadata is a JSON {type(meta).__name__}, not an object"
        )
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ArtifactError(
            str(paths.meta_file(d)),
            f"not a {FORMAT} v{VERSION} file (format {meta.get('format')!r}, version {meta.get('version')!r})",
        )
    return meta


def load_ticket(directory: str | os.PathLike[str]) -> WinningTicket:
    """Read a ticket written by :func:`save_ticket`.

    Raises:
        ArtifactError: missing files, a checksum mismatch, or tensors that disagree with the metadata.
        NumericalInstability: a stored weight is NaN or infinite.
    """
    d = Path(directory)
    meta = _read_meta(d)
    missing_keys = sorted({"round", "rewind_step", "config", "config_hash", "names", "records", "tensors_sha256"}
                          - set(meta))
    if missing_keys:
        raise ArtifactError(str(paths.meta_file(d)), f"ticket metadata lacks {missing_keys}")
    groups = _read_groups(d, meta)
    try:
        return WinningTicket(
            masks=groups["mask"],
            rewind_weights=groups["rewind"],
            trained_weights=groups["trained"],
            round=int(meta["round"]),
            rewind_step=int(meta["rewind_step"]),
            records=tuple(RoundRecord.from_dict(r) for r in meta["records"]),
            config=dict(meta["config"]),
            config_hash=str(meta["config_hash"]),
        )
    except (KeyError, TypeError, ValueError) as exc:  # malformed metadata that still parsed as JSON
        raise ArtifactError(
            str(paths.meta_file(d)), f"ticket metadata does not form a valid ticket: {exc!r}"
        ) from exc


def _read_groups(d: Path, meta: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The ticket's tensors by group (mask, rewind, trained), checksum and contents verified."""
    tfile = paths.tensors_file(d)
    if sha256_file(tfile) != meta["tensors_sha256"]:
        raise ArtifactError(str(tfile), "sha256 does not match ticket.json (corrupt or replaced file)")
    try:
        flat = load_file(str(tfile))
    except SafetensorError as exc:  # pragma: no cover - the checksum catches corruption first
        raise ArtifactError(str(tfile), f"unreadable safetensors file: {exc}") from exc
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for group in _GROUPS:
        names = meta["names"].get(group) if isinstance(meta["names"], dict) else None
        if not isinstance(names, list):
            raise ArtifactError(str(paths.meta_file(d)), f"ticket metadata has no list of {group} tensor names")
        missing = [n for n in names if f"{group}/{n}" not in flat]
        if missing:
            raise ArtifactError(str(tfile), f"{group} tensors {missing} listed in ticket.json are absent")
        groups[group] = {n: flat[f"{group}/{n}"] for n in names}
    for name, mask in groups["mask"].items():
        if mask.dtype != torch.bool:
            raise ArtifactError(str(tfile), f"mask '{name}' has dtype {mask.dtype}, expected torch.bool")
    for group in ("rewind", "trained"):
        for name, t in groups[group].items():
            check_finite(t, method="load_ticket", what=f"{group} weight", layer=name)
    return groups


class TicketStore:
    """The round-by-round state of one search under ``root`` (``root/round_NNN/``).

    ``save(ticket)`` after every completed round; ``latest()`` returns the last completed round's
    ticket (directories with no ``ticket.json`` are interrupted saves and are skipped; a committed
    round whose files no longer load is skipped with a warning, so a resumed search redoes it).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def save(self, ticket: WinningTicket) -> Path:
        return save_ticket(ticket, paths.round_dir(self.root, ticket.round))

    def completed_rounds(self) -> list[int]:
        """Rounds with a committed ``ticket.json``, ascending."""
        if not self.root.is_dir():
            return []
        found = (
            paths.round_of(p) for p in self.root.iterdir() if p.is_dir() and paths.meta_file(p).is_file()
        )
        return sorted(r for r in found if r is not None)

    def load(self, round_index: int) -> WinningTicket:
        return load_ticket(paths.round_dir(self.root, round_index))

    def latest(self, *, config_hash: str | None = None) -> WinningTicket | None:
        """The ticket of the last completed round that still loads, or None if there is none.

        A committed round whose checkpoint is corrupt (checksum mismatch, unreadable or incomplete
        metadata, missing or non-finite tensors) is skipped with a logged warning and the round
        before it is tried, so a resumed search recomputes only the broken round(s); its directory
        is overwritten when the round is saved again.

        Raises:
            ConfigError: ``config_hash`` is given and the stored search was run with another config.
        """
        for r in reversed(self.completed_rounds()):
            try:
                ticket = self.load(r)
            except (ArtifactError, NumericalInstability) as exc:
                logger.warning("round %d checkpoint in %s does not load (%s); falling back to the round before "
                               "(a resumed search recomputes round %d)", r, self.root, exc, r)
                continue
            if config_hash is not None and ticket.config_hash != config_hash:
                raise ConfigError(
                    "config",
                    f"{self.root} holds a search with config hash {ticket.config_hash}, not {config_hash}; "
                    "use a new directory or the same config",
                )
            return ticket
        return None


__all__ = ["FORMAT", "VERSION", "TicketStore", "load_ticket", "save_ticket"]
