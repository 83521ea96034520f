"""Both serving runtimes, started exactly as an AdapterDeployment renders them.

The operator's pure builders render the Deployment and ConfigMap of a hot-reload
AdapterDeployment whose base model and adapters live in S3; its pod then runs on this host
(tests/testground/hostpod.py): the `fetch-base-model` init container downloads the model, the
server starts with the rendered command, args and env (`kubetune serve`, or vLLM's OpenAI server
from its CPU build), and the `adapter-sync` sidecar fetches the adapters from S3 and loads them
through `/v1/load_lora_adapter`. The official openai client then calls each adapter, and a
second adapter added to the ConfigMap is loaded by the running server.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from kubetune_operator.adapterdeployment import builders
from kubetune_operator.settings import Settings
from kubetune_trainer.storage.transfer import upload_dir
from tests.conftest import eventually
from tests.testground.hostpod import HostPod, image_env
from tests.testground.s3 import SeaweedS3
from tests.trainer.serve_fixtures import PHRASES, train_adapter

pytestmark = [pytest.mark.s3, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAINER_IMAGE = "localhost/kubetune/trainer:test"
VLLM_IMAGE = "localhost/vllm-cpu:test"
# LoRA on the attention and MLP layers only: vLLM serves no LoRA on lm_head.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def vllm_dir() -> Path:
    path = Path(
        subprocess.run(
            [REPO / "hack/vllm-env.sh", "--print-dir"], capture_output=True, text=True
        ).stdout.strip()
    )
    if not (path / ".complete").exists():
        pytest.fail(f"vLLM's CPU environment is missing at {path}: run `make vllm` (part of `make test`)")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama vLLM's CPU kernels take (head size 64) and two trained LoRA adapters."""
    from kubetune_trainer.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("runtime-models")
    base = make_tiny_model(root / "base", hidden_size=128, num_heads=2, num_kv_heads=1, initializer_range=0.1)
    out = {"base": base}
    for name, rank in (("red", 16), ("num", 8)):
        out[name] = train_adapter(base, root / name, PHRASES[name], rank, steps=60, targets=TARGETS)
    return out


def _upload(s3: SeaweedS3, bucket: str, src: Path, prefix: str) -> str:
    uri = f"s3://{bucket}/{prefix}/"
    upload_dir(src, uri, client=s3.client())
    return uri


@pytest.mark.parametrize("runtime", ["builtin", "vllm"])
def test_runtime_as_rendered_serves_adapters_and_hot_reloads_one(
    runtime: str, vllm_dir: Path, models: dict[str, Path], s3: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    uris = {name: _upload(s3, s3_bucket, path, f"models/{name}") for name, path in models.items()}
    adep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "tiny", "namespace": "default", "uid": "00000000-0000-0000-0000-000000000001"},
        "spec": {
            "runtime": runtime,
            "baseModel": {"uri": uris["base"], "servedName": "tiny"},
            "hotReload": True,
            "storage": {"secretRef": {"name": "s3"}},
            # What a user of vLLM's CPU build sets (its KV cache defaults to 4 GiB); the builtin
            # server ignores both.
            "env": [
                {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
                {"name": "HF_HUB_OFFLINE", "value": "1"},
            ],
            "vllm": {"maxLoraRank": 16, "extraArgs": ["--dtype", "bfloat16", "--max-model-len", "512"]},
        },
    }
    pod = HostPod(
        spec={},
        workdir=tmp_path,
        images={TRAINER_IMAGE: REPO / ".venv/bin", VLLM_IMAGE: image_env(vllm_dir)},
        secrets={"s3": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}},
    ).create_network()
    settings = Settings(
        trainer_image=TRAINER_IMAGE, vllm_image=VLLM_IMAGE, default_s3_endpoint=s3.endpoint_at(pod.host_ip)
    )
    first = [builders.ResolvedAdapter("red", uris["red"])]
    config_map = builders.config_map(adep, first)
    deployment = builders.deployment(adep, first, settings)
    pod.spec = deployment["spec"]["template"]["spec"]
    pod.config_maps = {config_map["metadata"]["name"]: config_map["data"]}
    server = pod.spec["containers"][0]
    # The pod is the one a user gets: the rendered command, an init step for the base model in S3.
    if runtime == "vllm":
        assert server["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        assert [c["name"] for c in pod.spec["initContainers"]] == ["fetch-base-model"]
    else:
        assert server["command"] == ["kubetune"]
    assert [c["name"] for c in pod.spec["containers"]] == ["server", "adapter-sync"]

    from openai import OpenAI

    base_url = f"http://{pod.ip}:{builders.SERVER_PORT}"
    pod.start()
    try:

        def healthy() -> bool:
            if not pod.alive("server"):  # not an AssertionError: eventually() would keep waiting
                raise RuntimeError(f"the server exited:\n{pod.logs('server')[-3000:]}")
            try:
                return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(healthy, timeout=600, interval=2, what=f"the {runtime} server to answer /health")
        api = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=60)

        def served() -> set[str]:
            if not pod.alive("adapter-sync"):
                raise RuntimeError(f"adapter-sync exited:\n{pod.logs('adapter-sync')[-3000:]}")
            return {m.id for m in api.models.list().data}

        eventually(lambda: "red" in served(), timeout=180, interval=1, what="adapter-sync to load red")
        answer = api.completions.create(model="red", prompt="the cat ->", max_tokens=8, temperature=0)
        assert answer.choices[0].text.split()[:2] == PHRASES["red"].split()[:2], answer

        # A second adapter in the ConfigMap: the running server loads it, nothing restarts.
        both = [*first, builders.ResolvedAdapter("num", uris["num"])]
        pod.write_config_map(config_map["metadata"]["name"], builders.config_map(adep, both)["data"])
        eventually(lambda: "num" in served(), timeout=180, interval=1, what="adapter-sync to load num")
        answers = {
            m: api.completions.create(model=m, prompt="two red ->", max_tokens=8, temperature=0)
            .choices[0]
            .text
            for m in ("red", "num")
        }
        assert {m: a.split()[:2] for m, a in answers.items()} == {m: PHRASES[m].split()[:2] for m in answers}
        assert pod.alive("server")
    finally:
        pod.stop()


def test_vllm_parses_the_rendered_arguments_as_meant(vllm_dir: Path) -> None:
    """spec.baseModel's options and the trained rank, as vLLM's own parser (its OpenAI server's,
    with its checks) reads the arguments the operator renders."""
    adep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "tiny", "namespace": "default", "uid": "u-1"},
        "spec": {
            "runtime": "vllm",
            "resources": {"gpus": 1},
            "baseModel": {
                "uri": "hf://org/tiny",
                "revision": "v2",
                "dtype": "bfloat16",
                "trustRemoteCode": True,
            },
        },
    }
    settings = Settings(
        trainer_image=TRAINER_IMAGE,
        vllm_image=VLLM_IMAGE,
        image_pull_policy="IfNotPresent",
        default_s3_endpoint="",
        default_s3_region="us-east-1",
        default_s3_secret="",
        termination_grace_seconds=30,
    )
    adapters = [builders.ResolvedAdapter("q", "s3://b/q/", 96)]  # a QLoRA job's saved rank
    [server] = builders.deployment(adep, adapters, settings)["spec"]["template"]["spec"]["containers"]
    script = (
        "import json, sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])\n"
        "validate_parsed_serve_args(args)\n"
        "keys = ('model', 'revision', 'dtype', 'trust_remote_code', 'max_lora_rank', 'enable_lora')\n"
        "print(json.dumps({k: getattr(args, k) for k in keys}))\n"
    )
    res = subprocess.run(
        [str(vllm_dir / "bin" / "python"), "-c", script, *server["args"]],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    parsed = json.loads(res.stdout.strip().splitlines()[-1])
    assert parsed == {
        "model": "org/tiny",
        "revision": "v2",
        "dtype": "bfloat16",
        "trust_remote_code": True,
        "max_lora_rank": 128,
        "enable_lora": True,
    }
