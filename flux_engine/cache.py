"""The flux-engine cache folder: downloads, prepared models and tuned kernel configs live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FLUX_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/flux_engine``, else ``~/.cache/flux_engine``."""
    override = os.environ.get("FLUX_ENGINE_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flux_engine"
