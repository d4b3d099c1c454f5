"""The ``prune`` command line: run and validate compression jobs described by YAML configs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flows.preflight import check_inputs, check_services
from flows.runtime import configure_environment
from pruning_core.errors import ArtifactError, PruningError

EPILOG = """\
examples:
  prune run configs/default.yaml                 Wanda 50% on the shipped SmolLM2-135M
  prune run configs/sparsegpt-2of4.yaml --output-dir runs/sgpt
  prune validate configs/wanda-50.yaml           check a config without running it

A run writes DIR/summary.json (default DIR: runs/<name>-<config hash>) and logs one MLflow run
(default store: sqlite:///./mlflow.db; set MLFLOW_TRACKING_URI for a server). Prefect runs the
flow on its ephemeral local server unless PREFECT_API_URL points at a server. Running the same
config again resumes the job where it stopped.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune",
        description="Compress neural networks: one-shot LLM pruning (magnitude, Wanda, SparseGPT), "
        "Minitron depth/width search, Lottery Ticket rounds. Jobs run as Prefect flows tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the job a YAML config describes",
                         description="Run the job a YAML config describes (job: oneshot | minitron | lottery).")
    run.add_argument("config", type=Path, help="YAML job config (see configs/)")
    run.add_argument("--output-dir", type=Path, default=None, help="where artifacts and summary.json go")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    check = sub.add_parser("validate", help="validate a config and print it with defaults filled in")
    check.add_argument("config", type=Path)
    return parser


def _run(config_path: Path, output_dir: Path | None) -> dict:
    """Check everything that can fail before long work, then run the job, holding its output
    directory for the whole run: a second identical ``prune run`` waits, then attaches to the
    finished result instead of doing the work again."""
    from flows.jobs import load_config, run_job
    from flows.rundir import check_output_dir, default_output_dir, exclusive_run, finished_summary

    job = load_config(config_path)
    out = (output_dir if output_dir is not None else default_output_dir(job)).resolve()
    check_inputs(job)
    check_output_dir(out)
    check_services(job)
    with exclusive_run(out) as waited:
        done = finished_summary(out, job) if waited else None
        if done is not None:
            logging.getLogger(__name__).info("%s: the run this one waited for finished it; its summary:", out)
            return done
        from flows.execution import start_prefect_server

        start_prefect_server()  # tied to this process: never outlives it, even after SIGKILL
        _typed_errors_without_traceback()
        return run_job(job, out)


class _NoTracebackForTypedErrors(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; for a PruningError (bad input, a
    full disk: the CLI prints its message, naming the object) the message alone is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PruningError):
            record.exc_info, record.exc_text = None, None
        return True


def _typed_errors_without_traceback() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForTypedErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForTypedErrors())


def _validate(config_path: Path) -> None:
    from flows.jobs import load_config

    job = load_config(config_path)
    check_inputs(job)  # the model directory and texts: what `prune run` would fail on in prepare
    sys.stdout.write(json.dumps(job.model_dump(mode="json"), indent=2) + f"\njob hash: {job.job_hash()}\n")


def execute(args: argparse.Namespace) -> dict | None:
    """Run a parsed command; raises what it fails with (``main`` turns a PruningError into a message)."""
    if args.command == "validate":
        _validate(args.config)
        return None
    try:
        return _run(args.config, args.output_dir)
    except OSError as exc:  # a disk or permission error no artifact write caught: name the path
        if exc.filename is None:
            raise
        raise ArtifactError(str(exc.filename), f"{exc.strerror} (errno {exc.errno})") from exc


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):  # one line per API request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        summary = execute(args)
    except PruningError as e:
        sys.stderr.write(f"prune: error: {e}\n")
        return 2
    if summary is not None:
        sys.stdout.write(json.dumps({k: summary[k] for k in summary if k != "layers"}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
