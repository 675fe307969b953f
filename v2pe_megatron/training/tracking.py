"""Experiment tracking: MLflow on rank 0, nothing elsewhere.

With no ``tracking.tracking_uri`` the store is embedded: ``sqlite:///runs/<recipe>/mlflow.db`` with
artifacts under ``runs/<recipe>/mlruns`` (no server to run; ``mlflow ui --backend-store-uri`` on the
same URI shows it). Any server works via ``tracking.tracking_uri=http://host:port``. A resumed run
re-opens the same MLflow run (its id is kept in the checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from v2pe_megatron.config import Recipe, flatten, to_dict

log = logging.getLogger(__name__)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def resolve_tracking_uri(recipe: Recipe) -> str:
    if recipe.tracking.tracking_uri:
        return recipe.tracking.tracking_uri
    d = default_run_dir(recipe).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


class Tracker:
    """No-op unless ``active`` (rank 0 with tracking.backend=mlflow)."""

    def __init__(self, recipe: Recipe, *, active: bool, run_id: Optional[str] = None):
        self.active = active and recipe.tracking.backend == "mlflow"
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        if not self.active:
            return
        import mlflow

        self._mlflow = mlflow
        self.uri = resolve_tracking_uri(recipe)
        mlflow.set_tracking_uri(self.uri)
        artifacts = (default_run_dir(recipe) / "mlruns").resolve().as_uri()
        exp = mlflow.get_experiment_by_name(recipe.tracking.experiment)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(recipe.tracking.experiment,
                                                                        artifact_location=artifacts)
        if recipe.tracking.system_metrics:
            mlflow.enable_system_metrics_logging()
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                               run_name=recipe.tracking.run_name or recipe.name)
        self.run_id = run.info.run_id
        if run_id is None:
            params = {k: str(v)[:500] for k, v in flatten(to_dict(recipe)).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.active:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self.active:
            self._mlflow.end_run(status=status)
            self.active = False
