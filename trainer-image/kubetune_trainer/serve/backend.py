"""What the OpenAI layer (:mod:`.serving`, :mod:`.app`) needs from the server that owns the model.

:class:`~.server.ModelServer` implements :class:`ServingBackend` and builds the HTTP app over
itself; the app and the serving class see only this protocol (as vLLM's ``OpenAIServing`` sees an
``EngineClient``), so ``server`` imports ``app`` and nothing imports back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .engine import Engine
    from .metrics import ServerMetrics


@dataclass
class AdapterState:
    """One adapter the server is supposed to serve (configured or loaded through the API)."""

    source: str
    loaded: bool = False
    error: str | None = None
    path: str | None = None
    rank: int | None = None
    # First load through the API in progress: not part of the set /ready waits for until it succeeds
    # (a hot load waits for the running batch; every replica doing one must not turn unready).
    adding: bool = False


class ServingBackend(Protocol):
    engine: Engine
    metrics: ServerMetrics
    adapters: dict[str, AdapterState]
    base_name: str | None
    base_source: str | None
    created: int
    fatal: BaseException | None
    lock: threading.RLock  # guards adapters, base_name and the default model

    @property
    def lm(self) -> Any: ...

    def json_grammar(self, schema: dict[str, Any] | None) -> Any: ...

    def adapter_roots(self) -> list[str]: ...

    def load_adapter(self, name: str, source: str, *, replace: bool = False) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def model_names(self) -> list[str]: ...

    def resolve_model(self, requested: str | None) -> str | None: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...
