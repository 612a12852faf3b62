#!/usr/bin/env bash
# Sets everything up and shows ekm working: installs what is missing, builds
# and installs ekm (release) into the system PostgreSQL 15, starts a
# throwaway cluster (port 55440, data under /tmp/ekm-demo, run by an
# unprivileged user), encrypts a sample `people` table, shows key status,
# decrypts, activates a new key, and stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
echo "== building and installing ekm (release)"
cargo pgrx install --release --pg-config /usr/bin/pg_config
source scripts/lib.sh
dir=/tmp/ekm-demo; port=55440
trap 'cluster_stop "$dir" >/dev/null 2>&1 || true' EXIT
echo "== starting a throwaway cluster in $dir (port $port, shared_preload_libraries = 'ekm')"
cluster_start "$dir" "$port"
grep -h 'ekm:' "$dir/server.log" | sed 's/^/   server log: /'
cpsql "$dir" "$port" -d postgres -e <<'SQL'
\echo == create the extension: the first key is created and made active
CREATE EXTENSION ekm;
SELECT key_id, rotation_status, is_active, age_days, expires_in_days, needs_rotation FROM ekm.keys;

\echo == a sample people table, in plaintext (as the application has it today)
CREATE TABLE people (id int PRIMARY KEY, name text, email text, mobno text);
INSERT INTO people VALUES
  (1, 'Asha Rao',      'asha.rao@example.com',      '+919876543210'),
  (2, 'Ben Okafor',    'ben.okafor@example.com',    '+447700900123'),
  (3, 'Chen Wei',      'chen.wei@example.com',      '+8613800138000'),
  (4, 'Dana Levi',     NULL,                        '+972501234567'),
  (5, 'Eli Martins',   '',                          NULL);
SELECT * FROM people ORDER BY id;

\echo == encrypt the email and mobile columns in place, each bound to its column (context)
UPDATE people SET email = ekm_encrypt(email, 'public.people.email'),
                  mobno = ekm_encrypt(mobno, 'public.people.mobno');
SELECT id, name, left(email, 40) || '...' AS email_stored, ekm_key_id(email) AS key FROM people ORDER BY id;

\echo == the application reads through ekm_decrypt (NULL stays NULL, the empty string stays empty)
SELECT id, name, ekm_decrypt(email, 'public.people.email') AS email,
       ekm_decrypt(mobno, 'public.people.mobno') AS mobno FROM people ORDER BY id;

\echo == key status, the runbook get_key_status as one SELECT
SELECT * FROM ekm_key_status();

\echo == a value moved to another column does not decrypt
\set ON_ERROR_STOP off
SELECT ekm_decrypt(email, 'public.people.mobno') FROM people WHERE id = 1;
\set ON_ERROR_STOP on

\echo == a new key: new writes use it at once, old values still decrypt
SELECT ekm_activate_key(ekm_create_key()) AS new_active_key;
INSERT INTO people VALUES (6, 'Farah Khan', ekm_encrypt('farah.khan@example.com', 'public.people.email'), ekm_encrypt('+923001234567', 'public.people.mobno'));
SELECT ekm_key_id(email) AS key, count(*) FROM people WHERE email IS NOT NULL GROUP BY 1 ORDER BY 1;
SELECT id, ekm_decrypt(email, 'public.people.email') AS email FROM people ORDER BY id;

\echo == move the old values to the new key (rotation proper, batched in a background worker, is the next issue)
UPDATE people SET email = ekm_reencrypt(email, 'public.people.email'), mobno = ekm_reencrypt(mobno, 'public.people.mobno');
SELECT ekm_key_id(email) AS key, count(*) FROM people WHERE email IS NOT NULL GROUP BY 1 ORDER BY 1;
SELECT key_id, rotation_status, encryptions FROM ekm.keys;

\echo == the audit log
SELECT at::timestamp(0), acting_role, event, key_id, detail - 'master_key_source' AS detail FROM ekm.audit_log ORDER BY id;
SQL
echo "== stopping the cluster"
