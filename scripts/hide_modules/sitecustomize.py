"""Makes the top-level packages named in ``FLUX_HIDE_MODULES`` (comma-separated, default ``flwr,gguf``)
unimportable, as on the GPU image, which has neither: put this folder on ``PYTHONPATH``.

``import flwr`` then raises ``ModuleNotFoundError`` exactly as if the package were not installed, so
``scripts/gpu_validate.sh --rehearse`` proves on a machine that has them that collection and the runs do
not depend on them.
"""

import os
import sys


class _HiddenModules:
    """A ``sys.meta_path`` finder consulted first: refuses the hidden packages and their submodules."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by FLUX_HIDE_MODULES)", name=fullname)
        return None


_names = [n.strip() for n in os.environ.get("FLUX_HIDE_MODULES", "flwr,gguf").split(",") if n.strip()]
if _names:
    sys.meta_path.insert(0, _HiddenModules(_names))
