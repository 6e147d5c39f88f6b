#!/usr/bin/env bash
# Installs flux-engine with `pip install --no-build-isolation .` into a scratch environment that reuses
# the dependencies of the given interpreter's environment, then checks what a user imports.
set -euo pipefail
base_python=${1:?usage: install_check.sh PYTHON}
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

"$base_python" -m venv "$scratch/venv"
base_site=$("$base_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
new_site=$("$scratch/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Plain path entry: the base environment's packages are visible, its editable-install hooks are not.
echo "$base_site" > "$new_site/base_env.pth"

cp -r "$root" "$scratch/src"
rm -rf "$scratch/src/.venv" "$scratch/src/build" "$scratch"/src/flux_engine/_C*.so
"$scratch/venv/bin/python" -m pip install -q --no-build-isolation --no-deps "$scratch/src"

cd "$scratch"
"$scratch/venv/bin/python" - <<'PY'
import importlib.util, flux_engine, flux_engine._C, flux_engine.triton_kernels
assert "site-packages" in flux_engine.__file__, flux_engine.__file__
assert importlib.util.find_spec("triton_kernels") is None, "a top-level triton_kernels must not be installed"
print("install-check: flux_engine", flux_engine.__version__, "with _C (cuda:", flux_engine._C.has_cuda(), ") OK")
PY
