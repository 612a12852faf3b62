# Sessions driven step by step, and holding a rotation worker at a named
# protocol step, for the scenario scripts (the cluster runs with
# ekm.debug_pause_points = on; see docs/design.md, "Pause points"). Source it
# after lib.sh and tap.sh, with $dir and $port set.
#
# Each session reads from a FIFO the script writes to on a fixed file
# descriptor (11 to 14). Every process started in the background closes
# those descriptors (11>&- ... 14>&-): one that kept a copy would keep a
# session's input open after session_end, and the session would never end.

# session_start FD NAME [DB]: a psql session (database DB, default app)
# reading statements written to FD; its output goes to $dir/NAME.out.
session_start() {
  local fd=$1 name=$2 db=${3:-app}
  rm -f "$dir/$name.in" "$dir/$name.out"; mkfifo "$dir/$name.in"
  cpsql "$dir" "$port" -d "$db" -At -q <"$dir/$name.in" >"$dir/$name.out" 2>&1 11>&- 12>&- 13>&- 14>&- &
  eval "SESSION_PID_$name=\$!"
  eval "exec $fd>\"\$dir/\$name.in\""
}

# session_send FD SQL: sends SQL to the session on FD (it runs at once).
session_send() { printf '%s\n' "$2" >&"$1"; }

# session_line NAME REGEX: the first line of the session's output matching
# REGEX, once there is one (30 s at most).
session_line() {
  for _ in $(seq 1 600); do
    grep -E -m1 -- "$2" "$dir/$1.out" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# session_end FD NAME: closes the session's input; it ends.
session_end() {
  eval "exec $1>&-"
  eval "wait \$SESSION_PID_$2" 2>/dev/null
}

PAUSE_CLASS=1701539184 # 'ekmp'
pause_id() {
  case $1 in
    batch) echo 1 ;; pass_end) echo 2 ;; check) echo 3 ;;
    fence) echo 4 ;; final_check) echo 5 ;; retire) echo 6 ;;
    *) echo "unknown pause point $1" >&2; return 1 ;;
  esac
}

# pause_hold DB NAME: a session of its own in database DB (advisory locks
# belong to a database) takes the pause point's lock and keeps it until
# pause_release: workers of DB reaching NAME wait there.
pause_hold() {
  session_start 14 pause "$1"
  pause_also "$2"
}

# pause_also NAME: the holding session takes pause point NAME as well.
pause_also() {
  session_send 14 "SELECT pg_advisory_lock($PAUSE_CLASS, $(pause_id "$1")); SELECT 'held $1';"
  session_line pause "^held $1\$" >/dev/null || { echo "pause_hold: the lock of $1 was not taken" >&2; return 1; }
}

# pause_let NAME: the holding session lets pause point NAME go (and keeps
# the others): a worker waiting there goes on.
pause_let() {
  session_send 14 "SELECT pg_advisory_unlock($PAUSE_CLASS, $(pause_id "$1")); SELECT 'let $1';"
  session_line pause "^let $1\$" >/dev/null || { echo "pause_let: $1 was not let go" >&2; return 1; }
}

# pause_release: ends the holding session (its lock goes with it).
pause_release() { session_end 14 pause; }

# paused_at DB NAME: "yes" once a worker of DB waits at NAME (60 s at most).
paused_at() {
  local id; id=$(pause_id "$2")
  for _ in $(seq 1 1200); do
    [ "$(cpsql "$dir" "$port" -d "$1" -At -q -c "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = $PAUSE_CLASS AND objid = $id AND NOT granted)")" = t ] \
      && { echo yes; return; }
    sleep 0.05
  done
  echo no
}
