"""``ServerConfig``: what the built-in server serves and how it batches (torch-free).

Built from Python (``ModelServer(ServerConfig(...))``), a YAML file (``kubetune serve --config``),
command-line flags, or the operator's adapter-set file (``--adapter-set``, the JSON the
AdapterDeployment's ConfigMap holds: ``{"adapters": [{"name": ..., "uri": ...}]}``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kubetune_trainer.exit_codes import ConfigError

# PEFT keeps adapters in torch ModuleDicts, whose keys cannot contain '.'; '/' would escape the
# download directory. vLLM model names are freer, but these cover DNS-1123 names (the CRD's rule).
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch; reserved
Scheduling = Literal["mixed", "static", "per_adapter", "sequential"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_adapter_name(name: object, *, field: str = "adapter name") -> str:
    """The name, or ValueError saying what a valid name looks like."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
        raise ValueError(
            f"{field} {name!r} is not valid: use 1-128 letters, digits, '-' or '_', starting with a "
            "letter or digit (e.g. 'sql-lora')"
        )
    return name  # BASE_ROW ('__base__') cannot match: names start with a letter or digit


class ServerConfig(BaseModel):
    """The built-in server's settings. Every field has a default except what to serve."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_model: str | None = Field(
        None,
        description="base model: a local directory, file://, s3:// or a hub id; when unset, the "
        "base_model_name_or_path of the first adapter's adapter_config.json",
    )
    base_model_name: str | None = Field(
        None,
        description="the name clients use for the base model (OpenAI 'model'); default: the last "
        "path component of base_model",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters to load at start: name -> directory or s3:// URI"
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    max_batch_size: int = Field(
        16, ge=1, le=4096, description="most sequences generated together (the running batch's slots)"
    )
    batch_window_ms: float = Field(
        10.0,
        ge=0,
        le=10_000,
        description="requests that start together are collected until none arrived for this long: "
        "a static batch, or (continuous batching) a burst reaching an idle server, prefilled as one group; "
        "requests arriving while others run join at the next step without waiting",
    )
    batch_max_wait_ms: float = Field(
        100.0,
        ge=0,
        le=60_000,
        description="the longest the first of the requests that start together waits for the others",
    )
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="prompt + completion token limit; default: the model's max_position_embeddings",
    )
    dtype: DType = Field(
        "auto",
        description="auto: bfloat16 on GPUs that support it (float16 on older GPUs) and on CPUs that "
        "compute it natively (AMX or AVX-512 BF16), float32 on other CPUs; the same rule as training's "
        "precision: auto",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    scheduling: Scheduling = Field(
        "mixed",
        description="mixed: continuous batching, sequences join and leave the running batch at every "
        "step, whatever adapters they use; the baselines run static batches to their longest row: "
        "static (one generate() per batch), per_adapter (one per adapter), sequential (one request at "
        "a time, switching adapters)",
    )
    download_dir: str | None = Field(
        None, description="where s3:// models and adapters are downloaded (default: a temporary directory)"
    )
    revision: str | None = Field(
        None,
        description="model hub revision (branch, tag or commit) of a hub base model; ignored for directories",
    )
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint (keep false)")
    api_key_file: str | None = Field(
        None,
        description="file of API keys, one per line (a mounted Secret): every /v1 route then needs "
        "'Authorization: Bearer KEY'; re-read when it changes. /health, /ready and /metrics stay open",
    )
    admin_key_file: str | None = Field(
        None,
        description="file of admin keys, one per line: the only keys that may call "
        "/v1/load_lora_adapter and /v1/unload_lora_adapter (they work on every other /v1 route too); "
        "setting it turns those routes on",
    )
    runtime_adapter_updates: bool = Field(
        False,
        description="turn /v1/load_lora_adapter and /v1/unload_lora_adapter on (hot reload); without "
        "admin_key_file any API key may then use them. Off by default: a server nobody reloads keeps them off",
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="local directories and s3:// prefixes that /v1/load_lora_adapter may load from, "
        "besides download_dir; any other lora_path is refused (403)",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads when serving on CPU; default: the CPUs the container may use (its "
        "cgroup CPU limit), not the host's core count",
    )

    @field_validator("adapters")
    @classmethod
    def _names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name, source in adapters.items():
            check_adapter_name(name, field="adapters key")
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"adapters[{name!r}]: give a directory or an s3:// URI")
        return adapters

    @field_validator("adapter_roots")
    @classmethod
    def _roots(cls, roots: list[str]) -> list[str]:
        for root in roots:
            if not root.strip() or ("://" in root and not root.startswith(("s3://", "file://"))):
                raise ValueError(f"adapter_roots: {root!r} is not a directory, file:// or s3://bucket/prefix")
            if root.startswith("s3://") and not root[len("s3://") :].strip("/"):
                raise ValueError(f"adapter_roots: {root!r} names no bucket: write s3://bucket/prefix")
        return roots

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not _DEVICE_RE.match(device):
            raise ValueError(f"device {device!r} is not one of auto, cpu, mps, cuda, cuda:N")
        return device

    @field_validator("base_model_name")
    @classmethod
    def _base_name(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or name == BASE_ROW):
            raise ValueError(f"base_model_name {name!r} is empty or reserved: choose another name")
        return name

    @model_validator(mode="after")
    def _no_clash(self) -> ServerConfig:
        if self.base_model_name and self.base_model_name in self.adapters:
            raise ValueError(
                f"adapter {self.base_model_name!r} has the base model's name: rename the adapter or "
                "set base_model_name"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServerConfig:
        """Load a YAML (or JSON) file of these fields; errors name the file and the field."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read server config {p}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of ServerConfig fields, got {type(data).__name__}")
        return cls.validated(data, source=str(p))

    @classmethod
    def validated(cls, data: dict[str, Any], *, source: str = "server config") -> ServerConfig:
        """Validate, turning pydantic's errors into one ConfigError that names each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def load_adapter_set(path: str | Path) -> dict[str, str]:
    """Read the operator's adapter-set file: ``{"adapters": [{"name": ..., "uri": ...}, ...]}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read adapter set {p}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"adapter set {p} is not valid JSON: {exc}") from None
    entries = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'adapter set {p}: expected {{"adapters": [{{"name": ..., "uri": ...}}]}}')
    out: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry.get("uri"):
            raise ConfigError(f'adapter set {p}: adapters[{i}] needs string "name" and "uri" fields')
        try:
            name = check_adapter_name(entry["name"], field=f"adapters[{i}].name")
        except ValueError as exc:
            raise ConfigError(f"adapter set {p}: {exc}") from None
        if name in out:
            raise ConfigError(f"adapter set {p}: adapter {name!r} is listed twice")
        out[name] = str(entry["uri"])
    return out


def parse_adapter_pair(text: str, *, flag: str = "--adapter") -> tuple[str, str]:
    """``name=path_or_uri`` from the command line."""
    name, sep, source = text.partition("=")
    if not sep or not source.strip():
        raise ConfigError(f"{flag} {text!r}: write it as NAME=PATH_OR_URI, e.g. sql=s3://bucket/adapters/sql")
    try:
        return check_adapter_name(name.strip(), field=f"{flag} name"), source.strip()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
