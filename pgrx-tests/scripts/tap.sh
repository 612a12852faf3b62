# Tiny TAP-style helpers for the scenario scripts. Source it.
TAP_PASS=0
TAP_FAIL=0
ok() { TAP_PASS=$((TAP_PASS + 1)); echo "ok - $*"; }
not_ok() { TAP_FAIL=$((TAP_FAIL + 1)); echo "not ok - $*"; }
# check "description" actual expected
check() {
  if [ "$2" = "$3" ]; then ok "$1"; else not_ok "$1 (got '$2', want '$3')"; fi
}
# check_match "description" actual extended-regex
check_match() {
  if printf '%s' "$2" | grep -Eq -- "$3"; then ok "$1"; else not_ok "$1 (got '$2', want /$3/)"; fi
}
# check_log_clean LOG [N]: a counted check that the server log shows no
# crash (a process terminated by a signal, a PANIC, a crash restart), or
# exactly N of them when the test caused them on purpose.
check_log_clean() {
  local n
  n=$(grep -cE 'terminated by signal|was terminated by|PANIC|terminating any other active server processes|all server processes terminated; reinitializing' "$1" 2>/dev/null)
  check "server log $(basename "$(dirname "$1")")/$(basename "$1"): ${2:-0} crash lines" "$n" "${2:-0}"
}
# client_errors FILE...: lines of psql output that report a failure
client_errors() { cat "$@" 2>/dev/null | grep -cE 'ERROR|FATAL|psql: error|server closed the connection|connection to server .* failed|could not'; }
tap_done() {
  echo "$(basename "$0"): $TAP_PASS passed, $TAP_FAIL failed"
  [ "$TAP_FAIL" -eq 0 ]
}
