"""``kubetune serve`` / ``kubetune fetch`` as processes (python -m kubetune_trainer.serve), with S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.serve import ModelServer
from kubetune_trainer.serve.cli import build_parser, main, server_config_from_args
from kubetune_trainer.storage import s3_client_from_env, upload_dir
from tests.conftest import eventually
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models

__all__ = ["serve_models"]
CLI = [sys.executable, "-m", "kubetune_trainer.serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_of(*argv: str):
    return server_config_from_args(build_parser().parse_args(["serve", *argv]))


# ----------------------------------------------------------------------------- argument handling


def test_flags_config_file_and_adapter_set_merge(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text(
        "base_model: /models/base\nmax_batch_size: 4\nadapters: {a: /x/a}\n"
    )
    (tmp_path / "set.json").write_text(json.dumps({"adapters": [{"name": "b", "uri": "s3://bucket/b"}]}))
    cfg = config_of(
        "--config",
        str(tmp_path / "server.yaml"),
        "--adapter-set",
        str(tmp_path / "set.json"),
        "--adapter",
        "c=/x/c",
        "--max-batch-size",
        "8",
        "--served-name",
        "base",
    )
    assert cfg.adapters == {"a": "/x/a", "b": "s3://bucket/b", "c": "/x/c"}
    assert (cfg.base_model, cfg.base_model_name, cfg.max_batch_size) == ("/models/base", "base", 8)


@pytest.mark.parametrize(
    ("argv", "files", "message"),
    [
        ([], {}, "nothing to serve"),
        (["--adapter", "noequals"], {}, "NAME=PATH_OR_URI"),
        (["--adapter", "bad.name=/x"], {}, "is not valid"),
        (["--adapter", "a=/x", "--adapter", "a=/y"], {}, "given twice"),
        (["--adapter-set", "{dir}/set.json"], {"set.json": "{not json"}, "not valid JSON"),
        (
            ["--adapter-set", "{dir}/set.json"],
            {"set.json": '{"adapters": [{"name": "a"}]}'},
            'adapters[0] needs string "name" and "uri"',
        ),
        (["--config", "{dir}/c.yaml"], {"c.yaml": "base_model: x\nmax_batch_sise: 3\n"}, "max_batch_sise"),
        (["--base-model", "x", "--device", "tpu"], {}, "device 'tpu'"),
        (["--base-model", "x", "--served-name", "a", "--adapter", "a=/x"], {}, "base model's name"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(tmp_path: Path, capsys, argv, files, message) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    with pytest.raises(ConfigError, match=None) as exc:
        config_of(*argv)
    assert message in str(exc.value)
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- fetch


def test_fetch_local_directories(serve_models: ServeModels, tmp_path: Path) -> None:
    red = str(serve_models.adapters["red"])
    assert (
        main(
            [
                "fetch",
                "--dest",
                str(tmp_path / "adapters"),
                f"red={red}",
                f"num=file://{serve_models.adapters['num']}",
            ]
        )
        == 0
    )
    for name in ("red", "num"):
        assert (tmp_path / "adapters" / name / "adapter_config.json").is_file()
    assert main(["fetch", "--source", red, "--dest", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "adapter_model.safetensors").is_file()
    assert main(["fetch", "--dest", str(tmp_path / "x"), f"missing={tmp_path / 'nope'}"]) == 2
    assert main(["fetch", "--dest", str(tmp_path / "x")]) == 2  # neither --source nor pairs


@pytest.mark.s3
def test_fetch_from_s3_as_the_init_container_does(
    s3, s3_bucket: str, serve_models: ServeModels, tmp_path: Path
) -> None:
    client = s3_client_from_env(env=s3.env())
    for name, path in serve_models.adapters.items():
        upload_dir(path, f"s3://{s3_bucket}/jobs/{name}/final/", client=client)
    dest = tmp_path / "adapters"
    env = {**os.environ, **s3.env()}
    args = [*CLI, "fetch", "--dest", str(dest)] + [
        f"{n}=s3://{s3_bucket}/jobs/{n}/final/" for n in serve_models.adapters
    ]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name, path in serve_models.adapters.items():
        for f in path.iterdir():
            assert (dest / name / f.name).read_bytes() == f.read_bytes()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no partial downloads left
    missing = subprocess.run(
        [*CLI, "fetch", "--dest", str(dest), f"x=s3://{s3_bucket}/nothing/here/"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert "nothing to download" in missing.stderr


@pytest.mark.s3
def test_server_loads_adapters_from_s3(s3, s3_bucket: str, serve_models: ServeModels, tmp_path: Path) -> None:
    client = s3_client_from_env(env=s3.env())
    upload_dir(serve_models.adapters["num"], f"s3://{s3_bucket}/a/num/", client=client)
    upload_dir(serve_models.adapters["red"], f"s3://{s3_bucket}/a/red/", client=client)
    server = ModelServer(
        base_model=str(serve_models.base),
        adapters={"num": f"s3://{s3_bucket}/a/num/"},
        s3_client=client,
        download_dir=str(tmp_path / "downloads"),
        runtime_adapter_updates=True,
        adapter_roots=[f"s3://{s3_bucket}"],
    )
    with server.start_background() as run, httpx.Client(base_url=run.url, timeout=60) as h:
        server.wait_loaded()
        assert h.get("/ready").status_code == 200
        r = h.post(
            "/v1/load_lora_adapter", json={"lora_name": "red", "lora_path": f"s3://{s3_bucket}/a/red/"}
        )
        assert r.status_code == 200, r.text
        missing = h.post(
            "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": f"s3://{s3_bucket}/none/"}
        )
        assert missing.status_code == 404 and "nothing to download" in missing.json()["error"]["message"]
        for name in ("num", "red"):
            body = {"model": name, "prompt": "the sun ->", "max_tokens": 16, "temperature": 0}
            assert h.post("/v1/completions", json=body).json()["choices"][0]["text"] == PHRASES[name]


# ----------------------------------------------------------------------------- serve


@pytest.mark.s3
@pytest.mark.slow
def test_kubetune_serve_process(s3, s3_bucket: str, serve_models: ServeModels, tmp_path: Path) -> None:
    """The command the AdapterDeployment runs: adapters from flags and the adapter-set file (s3), SIGTERM."""
    upload_dir(
        serve_models.adapters["num"], f"s3://{s3_bucket}/num/", client=s3_client_from_env(env=s3.env())
    )
    adapter_set = tmp_path / "adapters.json"
    adapter_set.write_text(json.dumps({"adapters": [{"name": "num", "uri": f"s3://{s3_bucket}/num/"}]}))
    port = free_port()
    argv = [
        *CLI,
        "serve",
        "--base-model",
        str(serve_models.base),
        "--served-name",
        "tiny",
        "--adapter",
        f"red={serve_models.adapters['red']}",
        "--adapter-set",
        str(adapter_set),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--download-dir",
        str(tmp_path / "downloads"),
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, env={**os.environ, **s3.env()}, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/ready").status_code == 200
            except httpx.TransportError:
                return False

        eventually(ready, timeout=180, what="kubetune serve to become ready")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "red", "num"}
        chunks = client.chat.completions.create(
            model="num",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        assert "two three" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_kubetune_serve_exits_2_when_the_base_model_is_missing(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            *CLI,
            "serve",
            "--base-model",
            str(tmp_path / "no-model"),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 2, res.stderr
    assert "no-model" in res.stderr and "no directory" in res.stderr


# ----------------------------------------------------------------------------- base model options


def _hub_cache(root: Path, repo: str, revisions: dict[str, Path]) -> Path:
    """A model hub cache laid out as huggingface_hub writes it (refs -> snapshots/<commit>), so an
    offline load resolves a revision exactly as after a download."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for i, (ref, model_dir) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
        shutil.copytree(model_dir, repo_dir / "snapshots" / commit)
    return root


def test_revision_and_trust_remote_code_reach_the_model_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kubetune_trainer.tiny_model import make_tiny_model

    three_layers = make_tiny_model(tmp_path / "v2", num_layers=3)
    cache = _hub_cache(tmp_path / "hub", "kubetune/tiny", {"main": tiny_model_dir, "v2": three_layers})
    cfg = config_of("--base-model", "hf://kubetune/tiny", "--revision", "v2", "--trust-remote-code")
    assert (cfg.revision, cfg.trust_remote_code) == ("v2", True)
    # The load itself, offline from the cache: each revision gives its own weights.
    script = (
        "import sys; from kubetune_trainer.serve.cli import build_parser, server_config_from_args\n"
        "from kubetune_trainer.serve.model import LoadedModel\n"
        "c = server_config_from_args(build_parser().parse_args(['serve', *sys.argv[1:]]))\n"
        "lm = LoadedModel.load('kubetune/tiny', revision=c.revision, device='cpu', cpu_threads=1)\n"
        "print(lm.base.config.num_hidden_layers)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    layers = {}
    for rev in ("main", "v2"):
        out = subprocess.run(
            [sys.executable, "-c", script, "--base-model", "hf://kubetune/tiny", "--revision", rev],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        layers[rev] = int(out.stdout.split()[-1])
    assert layers == {"main": 2, "v2": 3}
