"""The Python API of the pruning pipeline: one function per job kind.

    from pruning_pipeline import oneshot, minitron, lottery

    summary = oneshot("smollm2", method="wanda", sparsity=0.5, output_dir="runs/wanda")
    summary, (model, tokenizer) = oneshot("smollm2", method="sparsegpt", pattern="2:4", return_model=True)

Each function builds the same validated pydantic job the YAML builds (:mod:`flows.jobs`: one
config model per kind, so the YAML and the Python API cannot drift) and runs the same Prefect flow
(:func:`flows.jobs.run_job`); the ``*_job`` functions only build and validate the job.
"""

from pruning_pipeline.api import lottery, lottery_job, minitron, minitron_job, oneshot, oneshot_job, run

__all__ = ["lottery", "lottery_job", "minitron", "minitron_job", "oneshot", "oneshot_job", "run"]
