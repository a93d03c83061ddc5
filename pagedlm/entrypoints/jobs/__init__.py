"""Dataset jobs: ``run_job(JobConfig(input=..., output=...))`` is ``pagedlm run`` from Python."""

from pagedlm.entrypoints.jobs.runner import JobConfig, run_job

__all__ = ["JobConfig", "run_job"]
