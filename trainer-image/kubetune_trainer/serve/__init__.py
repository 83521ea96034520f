"""The built-in, OpenAI-compatible multi-adapter server (docs/serving.md).

``ModelServer`` and ``ServerConfig`` import without torch; the model and HTTP stack load when a
server loads a model or starts.
"""

from .config import ServerConfig, load_adapter_set
from .server import ModelServer, RunningServer
from .sources import SourceError, SourceNotFoundError, fetch, fetch_one

__all__ = [
    "ModelServer",
    "RunningServer",
    "ServerConfig",
    "SourceError",
    "SourceNotFoundError",
    "fetch",
    "fetch_one",
    "load_adapter_set",
]
