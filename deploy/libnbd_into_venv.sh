#!/usr/bin/env bash
# Makes Debian's python3-libnbd binding importable in the venv. It is not on PyPI (the
# PyPI package named `nbd` is an unrelated tool: never install it) and is built for
# Debian's own Python, so the venv's Python must have the same minor version.
set -euo pipefail
py=${1:?usage: libnbd_into_venv.sh VENV_PYTHON}
dist=/usr/lib/python3/dist-packages
if [ ! -f "$dist/nbd.py" ]; then
  echo "libnbd: $dist/nbd.py is missing; install the Debian package python3-libnbd" >&2
  exit 1
fi
venv_minor=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
so=$(ls "$dist"/libnbdmod*.so | head -n1)
case "$so" in
  *cpython-${venv_minor/./}*) ;;
  *) echo "libnbd: $so is built for another Python than the venv's $venv_minor" >&2; exit 1 ;;
esac
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$site/_debian_libnbd"
mkdir -p "$shim"
ln -sf "$dist/nbd.py" "$shim/nbd.py"
ln -sf "$so" "$shim/$(basename "$so")"
echo "$shim" > "$site/debian_libnbd.pth"
"$py" -c 'import nbd; nbd.NBD()' || { echo "libnbd: import nbd failed in the venv" >&2; exit 1; }
