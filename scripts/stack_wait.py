"""Readiness probes for scripts/stack.sh: wait until a service of the local stack answers.

    stack_wait.py http URL [--expect TEXT]          an HTTP endpoint answers 200 (and contains TEXT)
    stack_wait.py dask ADDRESS --workers N          a Dask scheduler has N workers
    stack_wait.py prefect-worker API_URL POOL       a Prefect work pool has an ONLINE worker

Every probe takes ``--timeout`` (seconds) and ``--pid`` (the service's process: if it dies the
probe gives up at once instead of waiting out the timeout). Exit code 0 when ready, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _http_ok(url: str, expect: str | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - loopback URLs only
            body = resp.read().decode("utf-8", "replace")
            return resp.status == 200 and (expect is None or expect in body)
    except (urllib.error.URLError, OSError):
        return False


def _dask_workers(address: str, n: int) -> bool:
    from distributed import Client

    try:
        with Client(address, timeout=5) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"]) >= n
    except (OSError, TimeoutError):
        return False


def _prefect_worker_online(api: str, pool: str) -> bool:
    req = urllib.request.Request(
        f"{api.rstrip('/')}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:  # noqa: S310
            return any(w.get("status") == "ONLINE" for w in json.load(resp))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait(probe: Callable[[], bool], timeout: float, pid: int | None, what: str) -> bool:
    """Poll ``probe`` every 0.5 s until it is true, the timeout passes or ``pid`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        if not _alive(pid):
            sys.stderr.write(f"{what}: process {pid} exited before it was ready\n")
            return False
        time.sleep(0.5)
    sys.stderr.write(f"{what}: not ready after {timeout:.0f} s\n")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["http", "dask", "prefect-worker"])
    parser.add_argument("target", help="URL, scheduler address or Prefect API URL")
    parser.add_argument("pool", nargs="?", help="work pool (prefect-worker)")
    parser.add_argument("--expect", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--pid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.probe == "http":
        probe = lambda: _http_ok(args.target, args.expect)  # noqa: E731
    elif args.probe == "dask":
        probe = lambda: _dask_workers(args.target, args.workers)  # noqa: E731
    else:
        if not args.pool:
            parser.error("prefect-worker needs a work pool name")
        probe = lambda: _prefect_worker_online(args.target, args.pool)  # noqa: E731
    return 0 if wait(probe, args.timeout, args.pid, f"{args.probe} {args.target}") else 1


if __name__ == "__main__":
    raise SystemExit(main())
