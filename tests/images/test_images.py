"""The operator and trainer images `make images` built, run in real containers (runc).

Each container runs as a pod would: the image's USER (65532, no capabilities), a read-only root
filesystem, and writable volumes only where the chart and the operator mount emptyDirs (HOME,
/tmp, /workspace). A missing image or builder fails with what to run (`make images`).
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import eventually
from tests.integration.operator_support import finetunejob, get, install_crds, make_s3_secret
from tests.testground.cluster import ControlPlane
from tests.testground.images import (
    Container,
    app_version,
    image_config,
    image_id,
    local_name,
    repository,
    require_local,
    run_container,
)
from tests.testground.procs import free_port
from tests.testground.registry import Registry

UID = 65532


def volume(tmp_path: Path, name: str) -> Path:
    """A host folder like an emptyDir: world-writable, owned by root."""
    path = tmp_path / name
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def pod_mounts(tmp_path: Path, *paths: str) -> dict[str, Path]:
    return {p: volume(tmp_path, p.strip("/").replace("/", "-")) for p in paths}


@pytest.fixture(scope="module")
def operator_image() -> str:
    return require_local("operator")


@pytest.fixture(scope="module")
def trainer_image() -> str:
    return require_local("trainer")


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_image_runs_as_non_root_on_a_read_only_root(name: str, tmp_path: Path) -> None:
    image = require_local(name)
    assert image_config(image)["User"] == f"{UID}:{UID}", "a numeric USER, so runAsNonRoot can verify it"
    probe = (
        "import os, pathlib\n"
        "print(os.getuid(), os.getgid(), os.environ['HOME'])\n"
        "for p in ('/opt/kubetune/probe', '/probe'):\n"
        "    try:\n"
        "        pathlib.Path(p).write_text('x')\n"
        "        print('wrote', p)\n"
        "    except OSError as e:\n"
        "        print('read-only', p, e.errno)\n"
        "home = pathlib.Path(os.environ['HOME'], '.cache', 'x')\n"
        "home.mkdir(parents=True)\n"
        "print('home writable', home.is_dir())\n"
    )
    res = run_container(
        image,
        ["python", "-c", probe],
        env={"HOME": "/scratch/home"},  # any writable HOME, as a pod sets it
        mounts=pod_mounts(tmp_path, "/scratch", "/tmp"),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"{UID} {UID} /scratch/home"
    assert lines[1].startswith("read-only /opt/kubetune/probe 30") and lines[2].startswith(
        "read-only /probe 30"
    )
    assert lines[3] == "home writable True"


def test_trainer_image_imports_the_training_stack(trainer_image: str, tmp_path: Path) -> None:
    script = (
        "import shutil, sysconfig, pathlib\n"
        "import torch, transformers, peft, deepspeed, accelerate, bitsandbytes, sentence_transformers\n"
        "import kubetune_trainer, kubetune_trainer.cli\n"
        "print('versions', torch.__version__, transformers.__version__, peft.__version__, deepspeed.__version__)\n"
        "print('torch-cpu', torch.ones(2, 2).sum().item())\n"
        # DeepSpeed builds its CPU ops just in time: a C++ compiler and Python's headers.
        "print('cxx', shutil.which('g++') is not None)\n"
        "print('python-h', pathlib.Path(sysconfig.get_paths()['include'], 'Python.h').exists())\n"
        # kubetune's CPU kernels were built with the image: found there, loaded without a compiler run
        "from kubetune_trainer import kernels\n"
        "print('kernel', kernels.build(load=False))\n"
        "print('kernel-flags', kernels.cpu_has_required_flags())\n"
        "print('kernel-op', kernels.causal_attention_backward_op() is not None)\n"
    )
    res = run_container(
        trainer_image,
        ["python", "-c", script],
        mounts=pod_mounts(tmp_path, "/home/kubetune", "/tmp", "/workspace"),
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert out["torch-cpu"] == "4.0"
    assert out["cxx"] == "True" and out["python-h"] == "True"
    assert out["versions"].split()[0].startswith("2.")
    assert out["kernel"].startswith("/opt/kubetune/kernels/"), out["kernel"]
    if out["kernel-flags"] == "True":  # this CPU has AMX: the prebuilt kernel loads and is used
        assert out["kernel-op"] == "True", res.stderr


def test_trainer_image_default_command_is_kubetune_help(trainer_image: str, tmp_path: Path) -> None:
    cfg = image_config(trainer_image)
    assert cfg["Entrypoint"] == ["kubetune"] and cfg["WorkingDir"] == "/workspace"
    res = run_container(trainer_image, mounts=pod_mounts(tmp_path, "/home/kubetune", "/tmp"), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for sub in ("train", "serve", "fetch", "adapter-sync"):
        assert sub in res.stdout


def test_operator_image_has_no_torch(operator_image: str, tmp_path: Path) -> None:
    res = run_container(
        operator_image,
        ["python", "-c", "import torch"],
        mounts=pod_mounts(tmp_path, "/tmp"),
        timeout=60,
    )
    assert res.returncode == 1
    assert "ModuleNotFoundError: No module named 'torch'" in res.stderr


def test_operator_image_help(operator_image: str, tmp_path: Path) -> None:
    cfg = image_config(operator_image)
    res = run_container(
        operator_image, [*cfg["Entrypoint"], "--help"], mounts=pod_mounts(tmp_path, "/tmp"), timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "--kubeconfig" in res.stdout and "--namespace" in res.stdout


def embedded_kubeconfig(cluster: ControlPlane, path: Path) -> Path:
    """The admin kubeconfig with its certificates inlined (the container sees only this file)."""
    cfg = yaml.safe_load(cluster.kubeconfig.read_text())
    for entry, key in ((cfg["clusters"][0]["cluster"], "certificate-authority"),):
        entry[f"{key}-data"] = base64.b64encode(Path(entry.pop(key)).read_bytes()).decode()
    user = cfg["users"][0]["user"]
    for key in ("client-certificate", "client-key"):
        user[f"{key}-data"] = base64.b64encode(Path(user.pop(key)).read_bytes()).decode()
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o644)  # readable by 65532, like a mounted Secret
    return path


@pytest.mark.cluster
def test_operator_image_reconciles_against_the_api_server(
    cluster: ControlPlane, namespace: str, operator_image: str, tmp_path: Path
) -> None:
    """The image's entrypoint, host network, the control plane on loopback: a FineTuneJob gets its Job."""
    install_crds(cluster)
    make_s3_secret(cluster, namespace)
    conf = volume(tmp_path, "kube")
    embedded_kubeconfig(cluster, conf / "config")
    health = free_port()
    args = [
        *image_config(operator_image)["Entrypoint"],
        "--kubeconfig",
        "/etc/kubetune/config",
        "--namespace",
        namespace,
        "--health-port",
        str(health),
        "--metrics-port",
        str(free_port()),
    ]
    ctr = Container(
        operator_image,
        args,
        mounts={"/etc/kubetune": conf, **pod_mounts(tmp_path, "/tmp")},
        host_network=True,
    )
    log = tmp_path / "operator.log"
    ctr.start(log=log)
    try:

        def healthy() -> bool:
            assert ctr.alive(), f"the operator container exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        eventually(healthy, timeout=60, what="the operator container's /healthz")
        cluster.kubectl("apply", "-f", "-", namespace=namespace, input=json.dumps(finetunejob("img")))
        eventually(
            lambda: get(cluster, namespace, "job", "img-1") is not None,
            timeout=60,
            what=f"the operator container to create Job img-1\n(log: {log})",
        )
    finally:
        ctr.stop(timeout=15)
    assert ctr.popen is not None and ctr.popen.returncode is not None


def test_registry_holds_the_images_just_built(tmp_path: Path) -> None:
    """What `make images` pushed is what buildah has: the manifest's config is the local image's."""
    with Registry(tmp_path / "registry") as reg:
        for name in ("operator", "trainer"):
            ref = reg.require(repository(name), app_version())
            assert ref == f"localhost:{reg.port}/kubetune/{name}:{app_version()}"
            local_id = image_id(local_name(name))
            assert reg.config_digest(repository(name), app_version()) == local_id, (
                f"the registry's {name} image is not the one in buildah's storage: run `make images`"
            )
