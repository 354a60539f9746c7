"""Training logs where users look: TensorBoard event files and MLflow runs (``--log``).

The training loop hands over numbers it has already read back to the host, so logging costs no
extra wait for the device:

- at each read of the losses (every ``train.READ_EVERY`` steps and at the end of an epoch):
  ``train/loss`` (the mean over the steps since the previous read) and ``train/lr``;
- at the end of each epoch: ``epoch/train_loss``, ``epoch/train_error``, ``epoch/val_loss``,
  ``epoch/val_error`` (without a hold-out: none) and ``epoch/images_per_s``;
- at the end of the run: ``result/test_error``, ``result/test_top5_error`` and
  ``result/best_val_error`` where the run has them.

Every value is logged at the global optimizer step (1-based), errors as fractions as in every
file of the run directory. Only the first process logs.

``tensorboard`` writes event files into ``RUN_DIR/tensorboard/``. A resumed run opens a new
event file there with ``purge_step`` at the checkpoint's step + 1, so TensorBoard hides what the
stopped process logged after its last checkpoint and the steps continue without repeats.

``mlflow`` logs the resolved config as the run's params, the same metrics, and ``result.json``,
``curves.png`` and ``best.pt`` as artifacts, to the store named by ``MLFLOW_TRACKING_URI``
(experiment ``MLFLOW_EXPERIMENT_NAME``, else ``densenet``; run name: the run directory's).
Unset, MLflow itself would write to ``mlflow.db`` (``./mlruns`` before MLflow 3) in whatever
directory the command runs from, which a resume from elsewhere would not find; so the default
here is a store inside the run directory: ``sqlite:///RUN_DIR/mlflow.db`` with artifacts in
``RUN_DIR/mlartifacts/`` (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``).
An experiment this creates in a local SQLite store keeps its artifacts in ``mlartifacts/``
beside the file, not in ``./mlruns`` as MLflow would. ``RUN_DIR/mlflow.json`` records the store
and run id, so a resume continues the same run.
MLflow has no purge: after a kill, the steps between the last checkpoint and the kill are
logged twice.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

from .errors import UsageError
from .rundir import atomic_write_json

LOGS = ("tensorboard", "mlflow")
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking"}
INSTALL = {"tensorboard": "pip install 'densenet-torch[tensorboard]'",
           "mlflow": "pip install 'densenet-torch[mlflow]'"}
MLFLOW_RECORD = "mlflow.json"
EXPERIMENT = "densenet"


def parse_logs(value) -> tuple[str, ...]:
    """``--log`` values (names, comma lists of names, or a list of either) as a tuple of
    distinct names in the order given."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise UsageError(f"--log must be one or more of {', '.join(LOGS)}, got {value!r}.")
    names = [n.strip() for v in items for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGS]
    if unknown:
        raise UsageError(f"--log {unknown[0]!r} is not a training log; use "
                         f"{' or '.join(LOGS)} (both: --log tensorboard,mlflow).")
    return tuple(dict.fromkeys(names))


def check_installed(names: tuple[str, ...]) -> None:
    """Each log's package imports, or a UsageError naming the pip command; called before a run
    directory exists."""
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError as e:
            raise UsageError(f"--log {name} needs the {name} package, which is not installed "
                             f"({e}); install it with: {INSTALL[name]}") from None


class Logs:
    """The run's training logs (none, one or both), written to together."""

    def __init__(self, writers: list | None = None):
        self.writers = writers or []

    def step(self, step: int, loss: float, lr: float) -> None:
        self._all({"train/loss": loss, "train/lr": lr}, step)

    def epoch(self, step: int, row: dict) -> None:
        keys = ("train_loss", "train_error", "val_loss", "val_error", "images_per_s")
        self._all({f"epoch/{k}": row[k] for k in keys if row.get(k) is not None}, step)
        for w in self.writers:
            w.flush()

    def result(self, step: int, result: dict, files: list[Path]) -> None:
        keys = ("test_error", "test_top5_error", "best_val_error")
        self._all({f"result/{k}": result[k] for k in keys if result.get(k) is not None}, step)
        for w in self.writers:
            w.artifacts([f for f in files if f.is_file()])

    def close(self, status: str) -> None:
        """``status``: FINISHED (all epochs), KILLED (stopped by --max-steps, resumable) or
        FAILED."""
        for w in self.writers:
            w.close(status)
        self.writers = []

    def _all(self, values: dict, step: int) -> None:
        for w in self.writers:
            w.scalars(values, step)


def open_logs(names: tuple[str, ...], run_dir: Path, config: dict,
              resume_step: int | None) -> Logs:
    """The logs ``names`` for a run that starts (``resume_step`` None) or continues after
    ``resume_step`` optimizer steps (0 when it resumes without a checkpoint)."""
    check_installed(names)
    writers = []
    for name in names:
        if name == "tensorboard":
            writers.append(_TensorBoard(run_dir, resume_step))
        else:
            writers.append(_MLflow(run_dir, config, resume_step is not None))
    return Logs(writers)


class _TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        # events the stopped process wrote after its checkpoint (steps > resume_step) would
        # repeat steps: purge_step hides them from TensorBoard
        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def artifacts(self, files: list[Path]) -> None:
        """Event files only."""

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict, resuming: bool):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        self.metric = Metric
        record_path = run_dir / MLFLOW_RECORD
        if resuming and record_path.is_file():
            record = json.loads(record_path.read_text())
            self.client = MlflowClient(record["tracking_uri"] or _default_store(run_dir))
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        self.client = MlflowClient(uri or _default_store(run_dir))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                name, artifact_location=_artifact_root(uri, run_dir))
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"densenet.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, _param_value(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        atomic_write_json(record_path, {"tracking_uri": uri, "experiment_id": experiment_id,
                                        "run_id": self.run_id})

    def scalars(self, values: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, float(v), now, step)
                                                    for k, v in values.items()])

    def flush(self) -> None:
        """Each call above is already stored."""

    def artifacts(self, files: list[Path]) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _artifact_root(uri: str | None, run_dir: Path) -> str | None:
    """Where a new experiment keeps its files: beside the SQLite file of a local store (MLflow
    would choose ./mlruns in the working directory), in the run directory for its own store;
    a server decides for itself (None)."""
    if uri is None:
        return (run_dir / "mlartifacts").resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _default_store(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def _param_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)
