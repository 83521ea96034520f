"""Progress reporting: pure helpers, rate limiting, a real Prometheus scrape, failure tolerance."""

from __future__ import annotations

import logging
import math
import socket
import urllib.request

import pytest

from kubetune_trainer.progress import (
    CheckpointState,
    ProgressReporter,
    ProgressState,
    RateLimiter,
    build_status_patch,
    estimate_eta_seconds,
    merge_patches,
    progress_percent,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percent_and_eta() -> None:
    assert progress_percent(25, 100) == 25.0
    assert progress_percent(1, 3) == 33.33
    assert progress_percent(120, 100) == 100.0
    assert progress_percent(5, None) is None and progress_percent(5, 0) is None
    # 10 steps in 20 s since step 40 (resumed there): 50 steps left -> 100 s.
    assert estimate_eta_seconds(50, 100, first_step=40, elapsed_s=20.0) == 100.0
    assert estimate_eta_seconds(40, 100, first_step=40, elapsed_s=5.0) is None
    assert estimate_eta_seconds(50, None, first_step=0, elapsed_s=5.0) is None


def test_status_patch_shape_omits_unknowns_and_non_finite_values() -> None:
    progress = ProgressState(
        step=50,
        total_steps=200,
        epoch=1.234567,
        train_loss=1.5,
        eval_loss=float("nan"),
        learning_rate=2e-4,
        tokens_per_second=12345.678,
        eta_seconds=89.6,
        updated_at=0.0,
    )
    patch = build_status_patch(progress, CheckpointState("s3://b/p/checkpoints/checkpoint-50/", 50, 2))
    assert patch == {
        "status": {
            "progress": {
                "step": 50,
                "totalSteps": 200,
                "epoch": 1.2346,
                "percent": 25.0,
                "trainLoss": 1.5,
                "learningRate": 2e-4,
                "tokensPerSecond": 12345.7,
                "etaSeconds": 90,
            },
            "checkpoint": {"latest": "s3://b/p/checkpoints/checkpoint-50/", "step": 50, "count": 2},
        }
    }
    stamped = build_status_patch(ProgressState(step=1, updated_at=86400.0), None)
    assert stamped == {"status": {"progress": {"step": 1, "updatedAt": "1970-01-02T00:00:00Z"}}}
    assert build_status_patch(None, None) == {"status": {}}


def test_status_losses_have_four_significant_digits() -> None:
    """`kubectl get ftj` prints the LOSS column as stored: 0.7286, not 0.7285616397857666."""
    progress = ProgressState(step=1, train_loss=0.7285616397857666, eval_loss=12.345678)
    shown = build_status_patch(progress, None)["status"]["progress"]
    assert shown["trainLoss"] == 0.7286 and shown["evalLoss"] == 12.35


def test_merge_patches_newer_wins_field_by_field() -> None:
    older = {"status": {"progress": {"step": 1, "evalLoss": 2.0}, "checkpoint": {"step": 1}}}
    newer = {"status": {"progress": {"step": 2, "trainLoss": 1.0}}}
    assert merge_patches(older, newer) == {
        "status": {"progress": {"step": 2, "evalLoss": 2.0, "trainLoss": 1.0}, "checkpoint": {"step": 1}}
    }
    assert older["status"]["progress"]["step"] == 1  # inputs untouched


def test_rate_limiter() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock)
    assert limiter.due() and limiter.wait_time() == 0.0
    limiter.mark_sent()
    clock.now += 4
    assert not limiter.due() and limiter.wait_time() == pytest.approx(6.0)
    assert limiter.due(force=True)
    clock.now += 6
    assert limiter.due()
    with pytest.raises(ValueError, match="min_patch_interval_s"):
        RateLimiter(-1)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("kubetune_trainer_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_prometheus_metrics_are_served() -> None:
    clock = FakeClock()
    reporter = ProgressReporter(metrics_port=0, metrics_addr="127.0.0.1", show_bar=False, clock=clock)
    try:
        reporter.update(10, 110, 0.5, train_loss=2.5, learning_rate=1e-4, tokens_per_second=900.0)
        clock.now += 10
        reporter.update(20, 110, 1.0, eval_loss=2.25)
        reporter.checkpoint("s3://b/x/checkpoints/checkpoint-20/", 20, 1, upload_seconds=3.0)
        m = scrape(reporter.metrics_port or 0)
    finally:
        reporter.close()
    assert m["kubetune_trainer_step"] == 20
    assert m["kubetune_trainer_total_steps"] == 110
    assert m["kubetune_trainer_epoch"] == 1.0
    assert m["kubetune_trainer_train_loss"] == 2.5  # kept from the earlier update
    assert m["kubetune_trainer_eval_loss"] == 2.25
    assert m["kubetune_trainer_learning_rate"] == 1e-4
    assert m["kubetune_trainer_tokens_per_second"] == 900.0
    assert m["kubetune_trainer_eta_seconds"] == 90.0  # 10 steps per 10 s, 90 left
    assert m["kubetune_trainer_checkpoints_uploaded_total"] == 1
    assert m["kubetune_trainer_checkpoint_upload_seconds_count"] == 1
    assert m["kubetune_trainer_checkpoint_upload_seconds_sum"] == 3.0
    assert m['kubetune_trainer_checkpoint_upload_seconds_bucket{le="5.0"}'] == 1
    assert m['kubetune_trainer_checkpoint_upload_seconds_bucket{le="2.5"}'] == 0
    # The server is gone after close().
    with pytest.raises(OSError):
        scrape(reporter.metrics_port or 0)


def test_a_taken_metrics_port_costs_the_metrics_not_the_run(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with ProgressReporter(metrics_port=port, metrics_addr="127.0.0.1", show_bar=False) as reporter:
            reporter.update(1, 10, 0.1, train_loss=1.0)
            assert reporter.metrics_port is None
    assert f"metrics endpoint not started on port {port}" in caplog.text


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressReporter(show_bar=True) as reporter:
        for step in range(1, 5):
            reporter.update(step, 4, step / 4, train_loss=1.0 / step, learning_rate=1e-3)
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=0.2500" in err and "lr=1.00e-03" in err


def test_no_cluster_never_breaks_training(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    """In a pod without API access (or outside one) updates are logged once and dropped."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    caplog.set_level(logging.WARNING, logger="kubetune_trainer.progress")
    reporter = ProgressReporter(job=("ns", "job"), min_patch_interval_s=0.0, show_bar=False)
    for step in range(1, 20):
        reporter.update(step, 20, None, train_loss=math.inf)
    reporter.checkpoint("s3://b/x/", 19, 1)
    reporter.close()
    reporter.close()  # idempotent
    reporter.update(20, 20, None)  # after close: ignored, no error
    messages = [r.getMessage() for r in caplog.records]
    assert sum("status updates disabled" in m for m in messages) == 1
    assert reporter.patcher is not None and reporter.patcher.sent == 0


def test_job_must_be_namespace_and_name() -> None:
    with pytest.raises(ValueError, match=r"\(namespace, name\)"):
        ProgressReporter(job=("only-name",), show_bar=False)  # type: ignore[arg-type]


def test_patch_fields_exist_in_the_finetunejob_crd() -> None:
    """The API server silently prunes status fields the CRD schema does not declare."""
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[2]
    docs = [
        d
        for path in sorted([*repo.glob("crds/*.yaml"), *repo.glob("charts/*/crds/*.yaml")])
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict)
        and d.get("kind") == "CustomResourceDefinition"
        and d["spec"]["names"]["plural"] == "finetunejobs"
    ]
    if not docs:
        pytest.skip("the FineTuneJob CRD (crds/*.yaml) is not in the repository yet")
    version = next(v for v in docs[0]["spec"]["versions"] if v["name"] == "v1alpha1")
    assert "status" in version.get("subresources", {}), "the CRD needs the status subresource"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    full = ProgressState(
        step=1,
        total_steps=2,
        epoch=0.5,
        train_loss=1.0,
        eval_loss=1.0,
        learning_rate=1e-4,
        tokens_per_second=1.0,
        eta_seconds=1.0,
        updated_at=1.0,
    )
    patch = build_status_patch(full, CheckpointState("s3://b/x/", 1, 1))["status"]
    accepted = {int: ("integer", "number"), float: ("number",), str: ("string",)}
    for section, fields in patch.items():
        if status.get("x-kubernetes-preserve-unknown-fields"):
            continue  # everything under status is kept
        assert section in status.get("properties", {}), f"status.{section} is not declared in the CRD"
        schema = status["properties"][section]
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            continue
        for name, value in fields.items():
            declared = schema.get("properties", {})
            assert name in declared, f"status.{section}.{name} is not declared in the CRD"
            assert declared[name].get("type") in accepted[type(value)], (
                f"status.{section}.{name}: the CRD says {declared[name].get('type')}, the trainer sends {value!r}"
            )
