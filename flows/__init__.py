"""Prefect flows that run pruning_core as jobs, tracked in MLflow, behind the ``prune`` command.

    cli.py        prune run | validate
    jobs.py       the registry of job kinds (kind -> config model, flow), reading job configs
    config.py     JobBase and the sections jobs share (calibration, evaluation, runner, tracking)
    runtime.py    JobRun: claim the directory, the MLflow parent run, stages, summary, closing
    rundir.py     where a run's directory is, and claiming it
    execution.py  task options (transient retries), task runners (threads, Dask), thread budgets
    llm.py        what every LLM job shares: model directory, token windows, cached perplexity
    cache.py      content hashes and the small result cache under the cache root
    tracking.py   the MLflow adapter (the only MLflow import site)
    report.py     figures
    oneshot/, minitron/, lottery/   one package per job kind: config.py, tasks.py, flow.py
"""
