#!/usr/bin/env bash
# Idempotent set-up used by `make demo` and `make test`:
#   1. the Debian package dataset-fashion-mnist (the only change made outside the repo),
#   2. a virtual environment in <repo>/.venv,
#   3. `pip install -c constraints.txt -e '.[dev]'` into it, skipped while the stamp file
#      .venv/.vittt-installed is newer than pyproject.toml and constraints.txt.
# Environment: PYTHON (default python3) is the interpreter used to create the venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PKG="dataset-fashion-mnist"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.vittt-installed"

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. Debian package ------------------------------------------------------
apt_pkg_installed() {
    dpkg -s "$APT_PKG" 2>/dev/null | grep -q '^Status: install ok installed$'
}

if ! command -v dpkg >/dev/null 2>&1; then
    die "dpkg not found: this set-up needs a Debian-based system to install '$APT_PKG'."
fi
if ! apt_pkg_installed; then
    log "installing Debian package $APT_PKG (apt-get)"
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        die "'$APT_PKG' is not installed and you are not root and sudo is not available. Install it with: apt-get install $APT_PKG"
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q \
        || die "'apt-get update' failed; cannot install '$APT_PKG'."
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "$APT_PKG" \
        || die "'apt-get install $APT_PKG' failed."
    apt_pkg_installed || die "'$APT_PKG' is still not installed after apt-get."
fi

# --- 2. virtual environment -------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; set PYTHON to a Python >= 3.10."
    log "creating virtual environment $VENV"
    # --clear: a half-created .venv (no bin/python) is rebuilt from scratch.
    "$PYTHON" -m venv --clear "$VENV" \
        || die "'$PYTHON -m venv' failed (on Debian/Ubuntu the python3-venv package may be missing)."
fi

# --- 3. install the project -------------------------------------------------
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt constraints.txt ]; then
    log "dependencies up to date (remove $STAMP to force a reinstall)"
else
    log "installing vittt and dependencies into .venv (pip, pinned by constraints.txt)"
    rm -f "$STAMP"
    # --no-cache-dir: leave nothing in ~/.cache; -q still prints errors.
    "$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check \
        -c constraints.txt -e '.[dev]' \
        || die "pip install failed (see the errors above)."
    touch "$STAMP"
    log "done"
fi
