#!/usr/bin/env bash
# Builds Citus (a test dependency, never linked into ekm) for the system
# PostgreSQL 15 and installs it, from the source tarball in the shared
# vendor directory (no package registry reachable from these machines
# carries it), checked against its sha256. Cached: nothing is done when this
# version is installed already (a stamp file beside citus.control); a cold
# build takes about 8 minutes on 2 cores. Works as root and as a user with
# sudo. EKM_CITUS_TARBALL names the tarball if it is elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
CITUS_VERSION=13.2.2
if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
pkglib=$(/usr/bin/pg_config --pkglibdir)
extdir=$(/usr/bin/pg_config --sharedir)/extension
stamp=$extdir/citus.ekm-built-$CITUS_VERSION
if [ -f "$pkglib/citus.so" ] && [ -f "$stamp" ]; then
  echo "citus: $CITUS_VERSION is installed"
  exit 0
fi
tarball=""
for t in "${EKM_CITUS_TARBALL:-}" "vendor/citus-$CITUS_VERSION.tar.gz" "../shared/vendor/citus-$CITUS_VERSION.tar.gz" \
         "/work/shared/vendor/citus-$CITUS_VERSION.tar.gz"; do
  [ -n "$t" ] && [ -f "$t" ] && { tarball=$(cd "$(dirname "$t")" && pwd)/$(basename "$t"); break; }
done
[ -n "$tarball" ] || { echo "citus: citus-$CITUS_VERSION.tar.gz not found (set EKM_CITUS_TARBALL)" >&2; exit 1; }
if [ -f "$tarball.sha256" ]; then
  (cd "$(dirname "$tarball")" && sha256sum -c --quiet "$(basename "$tarball").sha256") \
    || { echo "citus: $tarball does not match its sha256" >&2; exit 1; }
else
  echo "dd2453caec20a830e5e63f1def5c5a98cb6f57ae510407cdcd800916fcdab430  $tarball" | sha256sum -c --quiet \
    || { echo "citus: $tarball does not match the sha256 of Citus $CITUS_VERSION" >&2; exit 1; }
fi
need=()
for p in libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev libssl-dev build-essential; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "citus: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
build=$(mktemp -d /tmp/ekm-citus-build.XXXXXX)
trap 'rm -rf "$build"' EXIT
echo "citus: building $CITUS_VERSION in $build (about 8 minutes on 2 cores)"
tar -xzf "$tarball" -C "$build"
src=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n1)
(cd "$src" && ./configure PG_CONFIG=/usr/bin/pg_config >"$build/configure.log" 2>&1) \
  || { tail -n 30 "$build/configure.log" >&2; exit 1; }
(cd "$src" && make -j"$(nproc)" >"$build/make.log" 2>&1) || { tail -n 40 "$build/make.log" >&2; exit 1; }
(cd "$src" && "${SUDO[@]}" make install >"$build/install.log" 2>&1) || { tail -n 30 "$build/install.log" >&2; exit 1; }
echo "$tarball" | "${SUDO[@]}" tee "$stamp" >/dev/null
echo "citus: $CITUS_VERSION installed into $pkglib"
