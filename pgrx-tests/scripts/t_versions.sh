#!/usr/bin/env bash
# What differs between PostgreSQL versions, shown on the version this run
# uses (EKM_PG=18 for PostgreSQL 18, else 15): generated columns computed
# from an encrypted column. STORED ones (every version) are recomputed by
# the rotation's UPDATE; VIRTUAL ones (18) store nothing and are computed
# when read, so a rotation has nothing of theirs to move, and PostgreSQL 18
# refuses ekm's functions in them (user-defined functions are not allowed
# in a virtual generated column; ekm_decrypt is not immutable either): no
# plaintext can hide in one. On 15 the VIRTUAL form does not exist.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
dir=/tmp/ekm-versions; port=61458
trap 'cluster_stop "$dir" immediate >/dev/null 2>&1' EXIT
cluster_start "$dir" "$port" || exit 1
q() { cpsql "$dir" "$port" -d postgres -At -q -c "$1" 2>&1; }
qerr() { cpsql "$dir" "$port" -d postgres -At -q -v VERBOSITY=verbose -c "$1" 2>&1 | grep -E '^ERROR' | head -n 1; }
wait_job() { cpsql "$dir" "$port" -d postgres -At -q -c "SELECT state FROM ekm_rotation_wait($1, 120)" 2>/dev/null; }
ver=$(q "SELECT current_setting('server_version_num')::int / 10000")
check "the server is PostgreSQL ${EKM_PG:-15}" "$ver" "${EKM_PG:-15}"
q "CREATE EXTENSION ekm" >/dev/null

q "CREATE TABLE gen (id int PRIMARY KEY, email text,
     email_key text GENERATED ALWAYS AS (ekm_key_id(email)) STORED,
     email_len int GENERATED ALWAYS AS (length(email)) STORED)" >/dev/null
if [ "$ver" -ge 18 ]; then
  q "ALTER TABLE gen ADD COLUMN email_vlen int GENERATED ALWAYS AS (length(email)) VIRTUAL" >/dev/null
  check_match "18: ekm_key_id (immutable) in a VIRTUAL generated column is refused by PostgreSQL" \
    "$(qerr "ALTER TABLE gen ADD COLUMN email_vkey text GENERATED ALWAYS AS (ekm_key_id(email)) VIRTUAL")" \
    '^ERROR:  0A000: generation expression uses user-defined function'
  check_match "18: ekm_decrypt in a VIRTUAL generated column is refused (not immutable)" \
    "$(qerr "ALTER TABLE gen ADD COLUMN email_plain text GENERATED ALWAYS AS (ekm_decrypt(email, 'gen.email')) VIRTUAL")" \
    '^ERROR:  42P17: generation expression is not immutable'
else
  check_match "15: VIRTUAL generated columns do not exist" \
    "$(qerr "ALTER TABLE gen ADD COLUMN email_vlen int GENERATED ALWAYS AS (length(email)) VIRTUAL")" '^ERROR:  42601: syntax error'
fi
check_match "ekm_decrypt in a STORED generated column is refused on every version (not immutable): no stored plaintext" \
  "$(qerr "ALTER TABLE gen ADD COLUMN email_plain text GENERATED ALWAYS AS (ekm_decrypt(email, 'gen.email')) STORED")" \
  '^ERROR:  42P17: generation expression is not immutable'
q "INSERT INTO gen (id, email) SELECT g, ekm_encrypt('g' || g || '@example.com', 'gen.email') FROM generate_series(1, 2000) g" >/dev/null
q "SELECT ekm_register_column('gen', 'email', 'gen.email')" >/dev/null
job=$(q "SELECT DISTINCT job_id FROM ekm_rotate(force => true)")
check "a rotation of the table ends done" "$(wait_job "$job")" done
check "STORED columns are recomputed from the new values" \
  "$(q "SELECT count(*) FROM gen WHERE email_key = (SELECT key_id FROM ekm.keys WHERE is_active) AND email_len = length(email) AND ekm_decrypt(email, 'gen.email') = 'g' || id || '@example.com'")" 2000
if [ "$ver" -ge 18 ]; then
  check "18: the VIRTUAL column reads the new values" "$(q "SELECT count(*) FROM gen WHERE email_vlen = length(email)")" 2000
fi
check_log_clean "$dir/server.log"
tap_done
