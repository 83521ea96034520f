"""Operator-wide defaults, read from the environment (the Helm chart sets them from values.yaml)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default) or default


@dataclass(frozen=True)
class Settings:
    trainer_image: str = field(
        default_factory=lambda: _env("KUBETUNE_TRAINER_IMAGE", "ghcr.io/kubetune/trainer:0.1.0")
    )
    vllm_image: str = field(default_factory=lambda: _env("KUBETUNE_VLLM_IMAGE", "vllm/vllm-openai:v0.11.0"))
    image_pull_policy: str = field(default_factory=lambda: _env("KUBETUNE_IMAGE_PULL_POLICY", "IfNotPresent"))
    # Used when a resource names no storage endpoint / Secret of its own.
    default_s3_endpoint: str = field(default_factory=lambda: _env("KUBETUNE_DEFAULT_S3_ENDPOINT", ""))
    default_s3_region: str = field(default_factory=lambda: _env("KUBETUNE_DEFAULT_S3_REGION", "us-east-1"))
    default_s3_secret: str = field(default_factory=lambda: _env("KUBETUNE_DEFAULT_S3_SECRET", ""))
    # Seconds a trainer gets after SIGTERM to save and upload a checkpoint.
    termination_grace_seconds: int = field(
        default_factory=lambda: int(_env("KUBETUNE_TRAINER_GRACE_SECONDS", "300"))
    )
    # Per-pod defaults for FineTuneJobs whose spec.resources leaves them out ("" = none).
    default_trainer_cpu: str = field(default_factory=lambda: _env("KUBETUNE_TRAINER_DEFAULT_CPU", ""))
    default_trainer_memory: str = field(default_factory=lambda: _env("KUBETUNE_TRAINER_DEFAULT_MEMORY", ""))
    default_trainer_shm: str = field(default_factory=lambda: _env("KUBETUNE_TRAINER_DEFAULT_SHM", ""))
    trainer_metrics_port: int = 9400
    rendezvous_port: int = 29500
    # Seconds the nodes of a multi-node job wait for each other at the rendezvous (pod 0).
    rendezvous_timeout_seconds: int = field(
        default_factory=lambda: int(_env("KUBETUNE_TRAINER_RENDEZVOUS_TIMEOUT_SECONDS", "1800"))
    )


def load() -> Settings:
    return Settings()
