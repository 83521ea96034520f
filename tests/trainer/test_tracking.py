"""Experiment tracking against real trackers: an MLflow server, TensorBoard event files, the curves PNG.

A tiny training reports to a real ``mlflow server`` (SQLite backend, started here) and to
TensorBoard; the test reads back what arrived (MlflowClient, TensorBoard's EventAccumulator),
and checks the ``training_curves.png`` + ``log_history.json`` that went to S3 with the adapter,
redrawn by ``kubetune plot s3://...``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_trainer.cli import main as kubetune
from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.quickstart import write_task_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MLFLOW_SERVER_VERSION = "3.17.2"


def _mlflow_server_command(*extra: str) -> list[str]:
    """`mlflow server` from the full mlflow package (dev extra), else run by uv in its own environment
    (the full server pins versions that the training environment may have outgrown)."""
    try:
        importlib.metadata.version("mlflow")
        return [sys.executable, "-m", "mlflow", "server", *extra]
    except importlib.metadata.PackageNotFoundError:
        pass
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.fail(
            "no MLflow server: install the dev extra (mlflow) or uv (`make venv` installs uv in .venv)"
        )
    # Pinned: 3.18.0's wheel set on PyPI is incomplete (its tracing package is missing).
    return [uv, "tool", "run", "--from", f"mlflow[auth]=={MLFLOW_SERVER_VERSION}", "mlflow", "server", *extra]


ADMIN_PASSWORD = "kt-admin-" + secrets.token_hex(6)


@contextlib.contextmanager
def _mlflow_server(root: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, artifacts proxied to a temp folder)."""
    port = _free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            *_mlflow_server_command(*extra),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # the first uv run installs the server
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same with MLflow's basic authentication (user admin)."""
    env = {
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(8),
    }
    with _mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), "--app-name", "basic-auth", env=env) as url:
        yield url


@pytest.mark.s3
@pytest.mark.slow
def test_a_run_reports_to_mlflow_and_tensorboard_and_ships_its_curves_to_s3(
    mlflow_server: str,
    s3,
    s3_bucket: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kubetune_trainer.job import run_training

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # The run sets this for TensorBoardCallback; monkeypatch removes it again afterwards.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unset-by-the-run")
    data = write_task_data(tmp_path / "data")
    out = tmp_path / "out"
    config = FinetuningConfig(
        model_name=str(tiny_model_dir),
        train_file=str(data["train"]),
        validation_file=str(data["validation"]),
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=0.003,
        logging_steps=1,
        eval_steps=3,
        progress_bar=False,
        storage_uri=f"s3://{s3_bucket}/runs",
        job={"namespace": "team-a", "name": "ft-tracked", "uid": "u-42"},
        report_to=["tensorboard", "mlflow"],
        mlflow={"tracking_uri": mlflow_server, "experiment": "kubetune-tracking-test"},
    )
    result = run_training(config)

    history = json.loads((out / "log_history.json").read_text())
    train_loss = {h["step"]: h["loss"] for h in history if "loss" in h}
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6]
    # evaluations at steps 3 and 6, then the final evaluate() (also at step 6)
    assert [s for s, _ in evals] == [3, 6, 6]

    # --- MLflow: one finished run with the hyperparameters and the loss at every step
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("kubetune-tracking-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "team-a/ft-tracked"
    assert run.data.tags["kubetune.job_uid"] == "u-42"
    assert run.data.tags["kubetune.output"] == f"s3://{s3_bucket}/runs/team-a/ft-tracked/u-42/"
    assert float(run.data.params["learning_rate"]) == 0.003
    assert run.data.params["max_steps"] == "6"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(logged) == sorted(train_loss)
    assert all(math.isclose(logged[s], train_loss[s], rel_tol=1e-6) for s in train_loss)
    eval_logged = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in eval_logged) == [3, 6, 6]
    assert math.isclose(run.data.metrics["eval_loss"], result.eval_metrics["eval_loss"], rel_tol=1e-6)
    assert "eval_perplexity" in run.data.metrics
    assert "training_curves.png" in [a.path for a in client.list_artifacts(run.info.run_id)]

    # --- TensorBoard: event files next to the adapter, with the same losses
    tb = out / "tensorboard"
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert {"train/loss", "eval/loss"} <= set(acc.Tags()["scalars"])
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(tb_loss) == sorted(train_loss)
    assert all(math.isclose(tb_loss[s], train_loss[s], rel_tol=1e-5) for s in train_loss)

    # --- the curves: a real picture next to the adapter, uploaded to S3 with it
    png = out / "training_curves.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 300
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # lines, text and legend, not a blank canvas
    assert result.adapter_uri is not None
    final = {
        o["Key"].rsplit("/final/", 1)[1]
        for o in s3.client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/team-a/ft-tracked/u-42/final/")[
            "Contents"
        ]
    }
    assert {"adapter_model.safetensors", "training_curves.png", "log_history.json"} <= final
    assert any(k.startswith("tensorboard/events.out.tfevents.") for k in final)

    # --- kubetune plot redraws it from S3 (and from the local run directory)
    redrawn = tmp_path / "from-s3.png"
    assert kubetune(["plot", result.adapter_uri, "-o", str(redrawn)]) == 0
    with Image.open(redrawn) as img:
        assert img.format == "PNG" and img.size == Image.open(png).size
    assert kubetune(["plot", str(out), "-o", str(tmp_path / "local.png")]) == 0
    assert (tmp_path / "local.png").stat().st_size > 10_000
    # A run still training has no log_history.json yet: the newest checkpoint's trainer_state.json.
    (out / "log_history.json").unlink()
    assert kubetune(["plot", str(out), "-o", str(tmp_path / "running.png")]) == 0
    assert (tmp_path / "running.png").stat().st_size > 10_000


def test_report_to_names_known_trackers_only() -> None:
    base = {"model_name": "m", "train_file": "t.jsonl"}
    assert FinetuningConfig(**base, report_to="tensorboard").report_to == ["tensorboard"]
    assert FinetuningConfig(**base, report_to="none").report_to == []
    assert FinetuningConfig(**base, report_to=["mlflow", "mlflow"]).report_to == ["mlflow"]
    with pytest.raises(ConfigError, match=r"report_to 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        FinetuningConfig.from_dict({**base, "report_to": ["tensorbord"]})
    with pytest.raises(ConfigError, match="report_to 'all' depends on whatever packages"):
        FinetuningConfig.from_dict({**base, "report_to": ["all"]})
    with pytest.raises(ConfigError, match=r"add mlflow to tracking\.reportTo"):
        FinetuningConfig.from_dict({**base, "mlflow": {"tracking_uri": "http://mlflow:5000"}})
    with pytest.raises(ConfigError, match="must not contain credentials"):
        FinetuningConfig.from_dict(
            {**base, "report_to": ["mlflow"], "mlflow": {"tracking_uri": "https://bob:pw@mlflow.example.com"}}
        )


def test_a_tracker_without_its_package_fails_before_training(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune_trainer.finetuner import ModelFinetuner

    # transformers' own switch makes the installed mlflow look absent, as in an image without it.
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    data = write_task_data(tmp_path / "data")
    ft = ModelFinetuner(
        FinetuningConfig(
            model_name=str(tiny_model_dir),
            train_file=str(data["train"]),
            output_dir=str(tmp_path / "out"),
            report_to=["tensorboard", "mlflow"],
        )
    )
    with pytest.raises(ConfigError, match=r"lacks its package: `pip install mlflow-skinny`"):
        ft.load_model()
    assert ft.model is None


def test_plot_explains_a_folder_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kubetune(["plot", str(tmp_path)]) == 2
    assert "neither log_history.json nor a checkpoint's trainer_state.json" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_credentials_come_from_the_environment_and_a_refusal_is_a_config_error(
    mlflow_auth_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from kubetune_trainer.tracking import TrackingRun

    config = FinetuningConfig(
        model_name="m",
        train_file="t.jsonl",
        output_dir="run-with-auth",
        report_to=["mlflow"],
        mlflow={"tracking_uri": mlflow_auth_server, "experiment": "with-auth"},
    )
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + ADMIN_PASSWORD)
    with pytest.raises(
        ConfigError, match=r"refused the request \(UNAUTHENTICATED\): give credentials"
    ) as info:
        TrackingRun(config, is_global_rank0=True).start()
    assert ADMIN_PASSWORD not in str(info.value)

    # The credentials a pod gets from its Secret: MLflow's client reads them from the environment.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    run = TrackingRun(config, is_global_rank0=True).start()
    run.end()
    finished = MlflowClient(mlflow_auth_server).get_run(run.mlflow_run_id)
    assert finished.info.status == "FINISHED" and finished.info.run_name == "run-with-auth"
