"""Training logs (--log): TensorBoard event files and MLflow runs, read back with their own
readers; a resumed run continues them; a missing package is a clear error."""

import json
import re
import shutil
import sys

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from densenet.errors import UsageError
from densenet.rundir import load_checkpoint
from densenet.tracking import parse_logs
from densenet.train import train

from test_loop import _cli
from test_train import TINY, make_folder_data

EPOCH_TAGS = {"epoch/train_loss", "epoch/train_error", "epoch/val_loss", "epoch/val_error",
              "epoch/images_per_s"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """36 images, 6 held out, batches of 8: 4 steps per epoch, read at each epoch's end."""
    return make_folder_data(tmp_path_factory.mktemp("tracking") / "data")


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """No MLflow settings from outside, and an empty working directory that must stay empty:
    every log goes to the run directory or the store named."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir())


def _run(data, out, **kw):
    kw.setdefault("epochs", 3)
    return train(TINY, "c10+", str(data), str(out), batch_size=8, quiet=True, seed=3,
                 set_fields={"val_size": "6"}, **kw)


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_the_losses_at_each_read_and_the_epochs_at_their_last_step(tmp_path,
                                                                                    data):
    _run(data, tmp_path / "run", log="tensorboard")
    scalars = _scalars(tmp_path / "run")
    assert set(scalars) == {"train/loss", "train/lr"} | EPOCH_TAGS | {"result/best_val_error"}
    for tag in {"train/loss", "train/lr"} | EPOCH_TAGS:
        assert [s for s, _ in scalars[tag]] == [4, 8, 12], tag
    rows = _rows(tmp_path / "run")
    for key in ("train_loss", "train_error", "val_loss", "val_error", "images_per_s"):
        assert [v for _, v in scalars[f"epoch/{key}"]] == pytest.approx([r[key] for r in rows],
                                                                         rel=1e-6), key
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in rows])
    # an epoch of 4 steps is read once, at its end: its loss is the epoch's
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [r["train_loss"] for r in rows], rel=1e-6)


def test_mlflow_gets_the_config_the_metrics_and_the_files(tmp_path, data):
    """Without MLFLOW_TRACKING_URI the store is the run directory's own."""
    run_dir = tmp_path / "run"
    _run(data, run_dir, log="mlflow")
    record = json.loads((run_dir / "mlflow.json").read_text())
    assert record["tracking_uri"] is None  # the run directory's store
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert run.data.params["model"] == TINY and run.data.params["recipe"] == "c10+"
    assert run.data.params == {k: v if isinstance(v, str) else json.dumps(v)
                               for k, v in config.items()}
    rows = _rows(run_dir)
    history = client.get_metric_history(run.info.run_id, "epoch/val_error")
    assert [(m.step, m.value) for m in history] == [(s, r["val_error"])
                                                    for s, r in zip((4, 8, 12), rows)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [4, 8, 12]
    assert set(run.data.metrics) == {"train/loss", "train/lr"} | EPOCH_TAGS | {
        "result/best_val_error"}
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"result.json", "curves.png", "best.pt"}
    assert (run_dir / "mlartifacts").is_dir()  # artifacts stay in the run directory


def test_a_resumed_run_continues_the_same_logs(tmp_path, data, monkeypatch):
    """Stopped after epoch 1, resumed through epoch 2, then as if killed before epoch 2's
    checkpoint was written and resumed to the end: TensorBoard shows each step once (what the
    killed process logged after its checkpoint is purged) and MLflow has one run."""
    store = tmp_path / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    run_dir = tmp_path / "run"
    _run(data, run_dir, log="tensorboard,mlflow", max_steps=4)
    shutil.copy(run_dir / "last.pt", tmp_path / "epoch1.pt")
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{store}")
    assert client.get_run(run_id).info.status == "KILLED"  # stopped, can be resumed
    train(resume=str(run_dir), quiet=True, max_steps=8)
    shutil.copy(tmp_path / "epoch1.pt", run_dir / "last.pt")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the run's store is in mlflow.json
    train(resume=str(run_dir), quiet=True)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3

    scalars = _scalars(run_dir)
    for tag in {"train/loss", "train/lr"} | EPOCH_TAGS:
        assert [s for s, _ in scalars[tag]] == [4, 8, 12], tag
    rows = _rows(run_dir)
    assert [v for _, v in scalars["epoch/val_loss"]] == pytest.approx([r["val_loss"] for r in rows],
                                                                      rel=1e-6)
    runs = client.search_runs([json.loads((run_dir / "mlflow.json").read_text())["experiment_id"]])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "epoch/train_loss"))
    assert steps == [4, 8, 8, 12]  # MLflow keeps the repeated epoch 2 (no purge there)
    # the files beside the store, not in ./mlruns of the working directory
    assert (tmp_path / "mlartifacts" / run_id / "artifacts" / "best.pt").is_file()


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"),
                                          ("mlflow", "mlflow.tracking")])
def test_a_missing_package_is_a_clear_error_before_the_run_directory(tmp_path, data, monkeypatch,
                                                                      name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    pip = f"pip install 'densenet-torch[{name}]'"
    with pytest.raises(UsageError, match=f"--log {name} needs the {name} package.*{re.escape(pip)}"):
        _run(data, tmp_path / "api", log=name)
    assert not (tmp_path / "api").exists()
    code, err = _cli(["train", "--model", TINY, "--recipe", "c10+", "--data", str(data), "--out",
                      str(tmp_path / "cli"), "--log", name])
    assert code == 2 and pip in err and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


def test_log_names_come_repeated_or_as_a_comma_list():
    assert parse_logs(["tensorboard", "mlflow"]) == ("tensorboard", "mlflow")
    assert parse_logs("tensorboard,mlflow") == parse_logs(["tensorboard,mlflow"])
    assert parse_logs(["mlflow", "mlflow,tensorboard"]) == ("mlflow", "tensorboard")
    assert parse_logs(None) == ()
    with pytest.raises(UsageError, match="--log 'wandb' is not a training log; use tensorboard "
                                         "or mlflow"):
        parse_logs("tensorboard,wandb")
    code, err = _cli(["train", "--log", "wandb", "--out", "/nonexistent/x"])
    assert code == 2 and "'wandb' is not a training log" in err
