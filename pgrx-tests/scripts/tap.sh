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
tap_done() {
  echo "$(basename "$0"): $TAP_PASS passed, $TAP_FAIL failed"
  [ "$TAP_FAIL" -eq 0 ]
}
