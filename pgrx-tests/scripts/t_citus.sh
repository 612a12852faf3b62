#!/usr/bin/env bash
# ekm on a Citus cluster (Citus 13.2.2 built by scripts/citus.sh; README,
# "Scaling out with Citus"; docs/design.md, section 9). A coordinator and two
# worker nodes on loopback ports, each with shared_preload_libraries =
# 'citus,ekm' and the same master key file:
#   1. one key catalog: CREATE EXTENSION ekm on the coordinator reaches the
#      worker node with Citus's propagation and the worker node gets the
#      coordinator's key, none of its own, in the same transaction; a node
#      added later has none until ekm_cluster_sync(), and ekm_health() on
#      the coordinator names it meanwhile;
#   2. per-row functions where Citus runs them: a 100,000-row distributed
#      table with two encrypted columns and a reference table; distributed
#      SELECTs decrypt on the worker nodes, router queries, INSERT ... SELECT
#      between colocated tables: the same answers as a plaintext shadow;
#   3. key changes reach every node in the coordinator's distributed
#      transaction: a new active key is the active key on every node, values
#      written after it are on it and decrypt everywhere; with a worker node
#      down the key change fails and no node has the new key; a rotation
#      whose retire cannot reach a worker node waits (not failed, nothing
#      retired anywhere) and finishes once the node is back; a worker node
#      with a different master key is named by ekm_health();
#   4. refusals (up front, with a SQLSTATE and a hint): key changes (the master key's rotation too) on a worker node; a node that
#      had ekm of its own with a used key refuses the coordinator's catalog;
#      a scan of the database records Citus tables as not scanned; a node
#      that cannot be reached is named by ekm_health();
#   6. rotation of distributed and reference tables through the coordinator:
#      registering registers every shard placement on the node that holds
#      it; a rotation of a 100,000-row distributed table (two encrypted
#      columns) and a reference table while clients write through the
#      coordinator, with one worker node held inside a batch and restarted
#      there: its job resumes, the old key retires on every node only after
#      both nodes are verified, every value of every placement is on the new
#      key and decrypts through the coordinator, no write is lost; progress
#      per node on the coordinator; cancel and resume from the coordinator
#      reach the nodes' jobs;
#   7. cluster operations during a rotation: a shard that a held node has
#      not rotated yet moves to a node that was already verified, and a node
#      added during the rotation (it gets the catalog from the job) receives
#      another one; the job follows both shards and ends with every
#      placement on the new key;
#   8. a value on a worker node that cannot be moved (bound to another
#      context): the coordinator's job fails naming the node, nothing is
#      retired anywhere; fixed, ekm_rotation_resume on the coordinator
#      resumes the node's part and the job ends done; a shard that moves
#      after the nodes' final check, before the retire: its new node refuses
#      the retire, the job waits, checks again and ends done; ekm_rollback()
#      on the coordinator moves every placement back to the previous key;
#   9. destroying keys across the nodes: ekm_scan_database() on the
#      coordinator starts a scan on every worker node; ekm_cleanup_old_keys
#      keeps a key while any node's registered columns or own scan hold
#      values on it, or a node has not scanned since it retired, or cannot be
#      reached, and destroys the others on every node at once;
#  10. the master key rotated from the coordinator: refused while a worker
#      node does not load the new master key (naming it; nothing changes on
#      any node), then every node's keys re-wrapped in one distributed
#      transaction; with only the new key configured every value decrypts;
#  11. a partitioned distributed table (a partition added after it was
#      registered too) rotates through the coordinator: every placement of
#      every partition on the new key;
#   5. no wrapped key material and no plaintext in any node's server log
#      (with citus.log_remote_commands = on, which logs every command the
#      coordinator sends, and after a worker node's apply was cancelled).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/lib.sh"
source "$here/tap.sh"
base=/tmp/ekm-citus
ports=(61461 61462 61463 61464)
cleanup() {
  for n in 0 1 2 3; do cluster_stop "$base$n" immediate >/dev/null 2>&1; done
}
trap cleanup EXIT
if [ ! -f "$(/usr/bin/pg_config --pkglibdir)/citus.so" ]; then
  not_ok "Citus is installed (bash scripts/citus.sh builds it)"; tap_done; exit 1
fi
# node n: data in $base$n, port ${ports[n]}
c() { cpsql "${base}0" "${ports[0]}" -d app -At -q -c "$1" 2>&1; }
w() { cpsql "$base$1" "${ports[$1]}" -d app -At -q -c "$2" 2>&1; }
werr() { cpsql "$base$1" "${ports[$1]}" -d app -At -q -v VERBOSITY=verbose -c "$2" 2>&1 | grep -E '^(ERROR|HINT)' | tr '\n' ' '; }
start_node() { # n [extra conf lines...]
  local n=$1; shift
  cluster_start "$base$n" "${ports[$n]}" "shared_preload_libraries = 'citus,ekm'" "max_prepared_transactions = 20" \
    "wal_level = logical" "citus.node_conninfo = 'sslmode=disable'" "ekm.master_key_file = '$base.key/master.key'" \
    "citus.log_remote_commands = on" "log_min_messages = notice" "client_min_messages = warning" "$@" \
    && cpsql "$base$n" "${ports[$n]}" -d postgres -q -c "CREATE DATABASE app" \
    && cpsql "$base$n" "${ports[$n]}" -d app -q -c "CREATE EXTENSION citus"
}
keys_of() { w "$1" "SELECT string_agg(key_id || ':' || rotation_status, ',' ORDER BY key_id) FROM ekm.keys"; }
digest_of() { w "$1" "SELECT ekm._ekm_cluster_state()::jsonb ->> 'digest'"; }

# one master key for every node (a file each node reads; in production each
# node's own ekm.master_key_command or file: README)
rm -rf "$base.key"; mkdir -p "$base.key"
python3 -c "import os, sys; sys.stdout.write(os.urandom(32).hex())" >"$base.key/master.key"
chmod 600 "$base.key/master.key"
[ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$base.key"
for n in 0 1 2; do start_node "$n" "ekm.debug_pause_points = on" "ekm.rotation_retry_pause = 100" >/dev/null || { not_ok "node $n starts"; tap_done; exit 1; }; done
c "SELECT citus_set_coordinator_host('127.0.0.1', ${ports[0]})" >/dev/null
c "SELECT citus_add_node('127.0.0.1', ${ports[1]})" >/dev/null

# --- 1. one key catalog ------------------------------------------------------
check "1: CREATE EXTENSION ekm on the coordinator" "$(c "CREATE EXTENSION ekm" && c "SELECT extversion = (SELECT default_version FROM pg_available_extensions WHERE name = 'ekm') FROM pg_extension WHERE extname = 'ekm'")" t
check "1: Citus created it on the worker node" "$(w 1 "SELECT count(*) FROM pg_extension WHERE extname = 'ekm'")" 1
k0=$(keys_of 0)
check_match "1: the coordinator has one active key" "$k0" '^key_[0-9_a-f]+:active$'
check "1: the worker node has the coordinator's key, in the same state" "$(keys_of 1)" "$k0"
check "1: and the same material (digest of ids, states, wrapped keys)" "$(digest_of 1)" "$(digest_of 0)"
check "1: the worker node made no key of its own (its audit log: the key received)" \
  "$(w 1 "SELECT string_agg(event, ',' ORDER BY id) FROM ekm.audit_log")" key_received
c "SELECT citus_add_node('127.0.0.1', ${ports[2]})" >/dev/null
check "1: a node added later gets ekm from Citus" "$(w 2 "SELECT count(*) FROM pg_extension WHERE extname = 'ekm'")" 1
check "1: but no key (it makes none of its own)" "$(w 2 "SELECT count(*) FROM ekm.keys")" 0
check_match "1: ekm_health() on the coordinator names it" \
  "$(c "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'citus_nodes'")" \
  "^failed: node 127.0.0.1:${ports[2]} does not have the coordinator's keys .*ekm_cluster_sync"
check "1: ekm_cluster_sync() sends the catalog to both worker nodes" "$(c "SELECT ekm_cluster_sync()")" 2
check "1: the new node has the coordinator's keys" "$(digest_of 2):$(keys_of 2)" "$(digest_of 0):$k0"
check_match "1: ekm_health() on the coordinator: every node has them and unwraps them" \
  "$(c "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'citus_nodes'")" '^ok: 2 worker node\(s\) have the coordinator.s 1 keys'
check_match "1: ekm_health_status() does not count it among what fails" "$(c "SELECT ekm_health_status()")" '^(ok|warning: [a-z_, ]+)$'

# --- 2. per-row functions where Citus runs them --------------------------------
c "CREATE TABLE people (id int PRIMARY KEY, email text, mobno text, email_plain text, mobno_plain text)" >/dev/null
c "SELECT create_distributed_table('people', 'id')" >/dev/null
c "INSERT INTO people SELECT g, ekm_encrypt('user' || g || '@example.com', 'public.people.email'), ekm_encrypt('+91' || lpad(g::text, 10, '0')),
                             'user' || g || '@example.com', '+91' || lpad(g::text, 10, '0') FROM generate_series(1, 100000) g" >/dev/null
check "2: 100,000 rows distributed over both worker nodes" \
  "$(c "SELECT count(*) FROM people")/$(w 1 "SELECT count(*) > 0 FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid) WHERE s.logicalrelid = 'people'::regclass AND p.groupid = (SELECT groupid FROM pg_dist_node WHERE nodeport = ${ports[1]})")/$(w 1 "SELECT count(*) > 0 FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid) WHERE s.logicalrelid = 'people'::regclass AND p.groupid = (SELECT groupid FROM pg_dist_node WHERE nodeport = ${ports[2]})")" \
  "100000/t/t"
check_match "2: the decrypting SELECT is pushed down to the worker nodes" \
  "$(c "EXPLAIN (VERBOSE, COSTS OFF) SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') LIKE 'user1%'" | grep -c 'ekm_decrypt(email')" '^[1-9]'
check "2: a distributed SELECT decrypts on the worker nodes: the shadow's answer" \
  "$(c "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') LIKE 'user1%'")" \
  "$(c "SELECT count(*) FROM people WHERE email_plain LIKE 'user1%'")"
check "2: every value of both columns decrypts to its shadow" \
  "$(c "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') = email_plain AND ekm_decrypt(mobno) = mobno_plain")" 100000
check "2: a router query" "$(c "SELECT ekm_decrypt(email, 'public.people.email') FROM people WHERE id = 4242")" user4242@example.com
check "2: a wrong context fails on the worker node as on one node (22023 or the like, no value)" \
  "$(c "SELECT ekm_decrypt(email, 'other') FROM people WHERE id = 4242" | grep -c '^ERROR')" 1
c "CREATE TABLE contacts (id int PRIMARY KEY, email text)" >/dev/null
c "SELECT create_distributed_table('contacts', 'id', colocate_with => 'people')" >/dev/null
c "INSERT INTO contacts SELECT id, ekm_encrypt(ekm_decrypt(email, 'public.people.email'), 'contacts') FROM people WHERE id <= 20000" >/dev/null
check "2: INSERT ... SELECT between colocated tables re-encrypts with another context" \
  "$(c "SELECT count(*) FROM contacts c JOIN people p USING (id) WHERE ekm_decrypt(c.email, 'contacts') = p.email_plain")" 20000
# the 2^32 random-nonce bound is the key's, across the nodes: each worker
# node encrypts 500 values in a session of its own, and the coordinator's
# health and policy count them with its own
c "SELECT run_command_on_workers(\$\$SELECT count(ekm_encrypt('n' || g)) FROM generate_series(1, 500) g\$\$)" >/dev/null
act=$(c "SELECT key_id FROM ekm.keys WHERE rotation_status = 'active'")
enc() { w "$1" "SELECT encryptions FROM ekm.keys WHERE key_id = '$act'"; }
e0=$(enc 0); e1=$(enc 1); e2=$(enc 2)
check_match "2: each worker node counts its own encryptions with the active key" "$e1:$e2" '^([5-9][0-9]{2}|[0-9]{4,}):([5-9][0-9]{2}|[0-9]{4,})$'
check "2: ekm_health() on the coordinator counts the active key's encryptions on every node" \
  "$(c "SELECT substring(detail from 'encrypted ([0-9]+) values') FROM ekm_health() WHERE \"check\" = 'encryptions'")" "$((e0 + e1 + e2))"
c "CREATE TABLE branches (code text PRIMARY KEY, vault text)" >/dev/null
c "SELECT create_reference_table('branches')" >/dev/null
c "INSERT INTO branches SELECT 'b' || g, ekm_encrypt('vault-' || g, 'branches') FROM generate_series(1, 100) g" >/dev/null
check "2: a reference table's values decrypt on the coordinator" \
  "$(c "SELECT count(*) FROM branches WHERE ekm_decrypt(vault, 'branches') = 'vault-' || substr(code, 2)")" 100
check "2: and joined on the worker nodes with a distributed table" \
  "$(c "SELECT count(*) FROM people p JOIN branches b ON b.code = 'b' || (p.id % 100 + 1) WHERE ekm_decrypt(b.vault, 'branches') = 'vault-' || (p.id % 100 + 1) AND p.id <= 5000")" 5000

# --- 3. key changes in the coordinator's distributed transaction ----------------
old=$(c "SELECT key_id FROM ekm.keys WHERE is_active")
new=$(c "SELECT ekm_activate_key(ekm_create_key())")
check_match "3: a new key, activated on the coordinator" "$new" '^key_'
for n in 1 2; do
  check "3: node $n has it active and the old key rotating, like the coordinator" "$(keys_of "$n")" "$(keys_of 0)"
done
check "3: node 1's audit log has each transition" \
  "$(w 1 "SELECT string_agg(event || ':' || (key_id = '$new'), ',' ORDER BY id) FROM ekm.audit_log WHERE id > 1")" \
  "key_rotating:false,key_received:true"
check_match "3: Citus refuses ekm_encrypt in an UPDATE of a distributed table (a volatile function: README)" \
  "$(c "UPDATE people SET email = ekm_encrypt('x', 'public.people.email') WHERE id = 1")" 'functions used in UPDATE queries on distributed tables must not be VOLATILE'
# the write README shows instead: INSERT ... ON CONFLICT DO UPDATE
c "INSERT INTO people (id, email, email_plain)
   SELECT id, ekm_encrypt('moved' || id || '@example.com', 'public.people.email'), 'moved' || id || '@example.com' FROM people WHERE id % 10 = 0
   ON CONFLICT (id) DO UPDATE SET email = excluded.email, email_plain = excluded.email_plain" >/dev/null
check "3: values written since are on the new key (INSERT ... ON CONFLICT DO UPDATE)" \
  "$(c "SELECT count(*) FILTER (WHERE ekm_key_id(email) = '$new') || '/' || count(*) FILTER (WHERE ekm_key_id(email) = '$old') FROM people")" 10000/90000
check "3: and every value decrypts through the coordinator" \
  "$(c "SELECT count(*) FROM people WHERE ekm_decrypt(email, 'public.people.email') = email_plain")" 100000
cluster_stop "${base}2" >/dev/null
err=$(c "SELECT ekm_activate_key(ekm_create_key())")
check_match "3: with a worker node down a key change fails" "$err" '^ERROR: '
check "3: and changed nothing on the coordinator or the node that is up" "$(keys_of 0):$(keys_of 1)" "$(keys_of 0):$(keys_of 0)"
check "3: the coordinator still has two keys" "$(c "SELECT count(*) FROM ekm.keys")" 2
cluster_restart_only "${base}2" >/dev/null
check "3: the node is back with the same keys" "$(keys_of 2)" "$(keys_of 0)"
# a rotation on the coordinator (its own table) whose retire cannot reach a
# worker node: the job waits, nothing is retired anywhere, and it finishes
# once the node is back
c "CREATE TABLE loc (id int PRIMARY KEY, secret text, plain text)" >/dev/null
c "INSERT INTO loc SELECT g, ekm_encrypt('s' || g, 'loc'), 's' || g FROM generate_series(1, 2000) g" >/dev/null
c "SELECT ekm_register_column('loc', 'secret', 'loc')" >/dev/null
dir=${base}0; port=${ports[0]}
source "$here/pause.sh"
pause_hold app retire
job=$(c "SELECT DISTINCT job_id FROM ekm_rotate(force => true)")
check "3: a rotation on the coordinator reaches its retire" "$(paused_at app retire)" yes
rotating=$(c "SELECT from_key FROM ekm.rotation_job WHERE job_id = $job")
cluster_stop "${base}2" >/dev/null
pause_release
waiting=""
for _ in $(seq 1 600); do
  waiting=$(c "SELECT state || ': ' || coalesce(waiting_for, '') FROM ekm.rotation_job WHERE job_id = $job")
  case $waiting in "running: a server that cannot be reached"*) break ;; esac; sleep 0.05
done
check_match "3: with a worker node down the job waits (not failed), saying which node" "$waiting" \
  "^running: a server that cannot be reached: .*127.0.0.1:${ports[2]}"
check "3: and its old key is retired nowhere" "$(c "SELECT rotation_status FROM ekm.keys WHERE key_id = '$rotating'"):$(w 1 "SELECT rotation_status FROM ekm.keys WHERE key_id = '$rotating'")" rotating:rotating
cluster_restart_only "${base}2" >/dev/null
check "3: once the node is back the job ends done" "$(c "SELECT state FROM ekm_rotation_wait($job, 120)" | tail -n 1)" done
for n in 0 1 2; do
  check "3: node $n has the old key retired" "$(w "$n" "SELECT rotation_status FROM ekm.keys WHERE key_id = '$rotating'")" retired
done
check "3: the coordinator's table is on the new key and decrypts" \
  "$(c "SELECT count(*) FROM loc WHERE ekm_decrypt(secret, 'loc') = plain AND ekm_key_id(secret) = (SELECT to_key FROM ekm.rotation_job WHERE job_id = $job)")" 2000
c "SELECT ekm_unregister_column('loc', 'secret')" >/dev/null
# a worker node configured with another master key
python3 -c "import os, sys; sys.stdout.write(os.urandom(32).hex())" >"$base.key/other.key"; chmod 600 "$base.key/other.key"
[ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$base.key"
echo "ekm.master_key_file = '$base.key/other.key'" | as_pg tee -a "${base}2/data/postgresql.conf" >/dev/null
cluster_stop "${base}2" >/dev/null; cluster_restart_only "${base}2" >/dev/null
check_match "3: ekm_health() names a node whose master key does not unwrap the keys" \
  "$(c "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'citus_nodes'")" \
  "^failed: node 127.0.0.1:${ports[2]}: key key_[0-9_a-f]+ does not unwrap under the master key this node loads"
as_pg sed -i '$d' "${base}2/data/postgresql.conf"
cluster_stop "${base}2" >/dev/null; cluster_restart_only "${base}2" >/dev/null
check_match "3: and is ok once it has the same master key" \
  "$(c "SELECT status FROM ekm_health() WHERE \"check\" = 'citus_nodes'")" '^ok$'

# --- 4. refusals ---------------------------------------------------------------
check_match "4: rotating the master key on a worker node is refused" \
  "$(werr 1 "SELECT * FROM ekm_rotate_master_key()")" "^ERROR:  55000: this is a Citus worker node"
check_match "4: a key change on a worker node is refused with a hint" \
  "$(werr 1 "SELECT ekm_create_key()")" "^ERROR:  55000: this is a Citus worker node: ekm's keys are managed on the coordinator HINT: "
check_match "4: so is ekm_cluster_sync() there" "$(werr 1 "SELECT ekm_cluster_sync()")" "^ERROR:  55000: this is a Citus worker node"
check_match "4: and applying a catalog by hand, by a non-superuser" \
  "$(cpsql "${base}1" "${ports[1]}" -d app -At -q -c "CREATE ROLE adm LOGIN; GRANT ekm_admin TO adm" >/dev/null; cpsql "${base}1" "${ports[1]}" -d app -U adm -At -q -c "SELECT ekm._ekm_cluster_apply('[]')" 2>&1)" \
  '^ERROR:  permission denied for (function|schema)'
check "4: the worker nodes' keys are unchanged" "$(keys_of 1):$(keys_of 2)" "$(keys_of 0):$(keys_of 0)"
# a node that had ekm of its own, with a key that encrypted a value
start_node 3 >/dev/null
cpsql "${base}3" "${ports[3]}" -d app -q -c "CREATE EXTENSION ekm" -c "CREATE TABLE local_secrets AS SELECT ekm_encrypt('mine') AS v" >/dev/null 2>&1
own=$(keys_of 3)
c "SELECT citus_add_node('127.0.0.1', ${ports[3]})" >/dev/null
check_match "4: a joining node with a used key of its own refuses the coordinator's catalog" \
  "$(cpsql "${base}0" "${ports[0]}" -d app -At -q -v VERBOSITY=verbose -c "SELECT ekm_cluster_sync()" 2>&1 | tr '\n' ' ')" \
  "ERROR:  55000: this worker node has key key_[0-9_a-f]+ of its own, which the coordinator does not have and which may hold values.*HINT: "
check "4: its own key and value are untouched" "$(keys_of 3):$(w 3 "SELECT ekm_decrypt(v) FROM local_secrets")" "$own:mine"
check "4: and the other nodes' keys are as they were" "$(keys_of 1):$(keys_of 2)" "$(keys_of 0):$(keys_of 0)"
c "SELECT citus_remove_node('127.0.0.1', ${ports[3]})" >/dev/null
check "4: with that node removed, ekm_cluster_sync() succeeds again" "$(c "SELECT ekm_cluster_sync()")" 2

# a scan of the database on the coordinator cannot read shards: it says so
scan=$(c "SELECT job_id FROM ekm_scan_database()")
check "4: a scan of the database on the coordinator ends" "$(c "SELECT state FROM ekm_rotation_wait($scan, 120)" | tail -n 1)" done
check "4: it records the Citus tables as not scanned (like foreign tables), not as holding nothing" \
  "$(c "SELECT string_agg(DISTINCT table_name::text, ',' ORDER BY table_name::text) FROM ekm.ciphertext_locations WHERE key_id LIKE 'not scanned: Citus table%'")" \
  "branches,contacts,people"
# a worker node that cannot be reached
cluster_stop "${base}2" >/dev/null
check_match "4: ekm_health() names a worker node it cannot reach" \
  "$(c "SELECT status || ': ' || detail FROM ekm_health() WHERE \"check\" = 'citus_nodes'")" "^failed: node 127.0.0.1:${ports[2]} cannot be checked"
cluster_restart_only "${base}2" >/dev/null

# --- 6. rotation of distributed and reference tables -------------------------
c "CREATE TABLE accounts (id int PRIMARY KEY, email text, mobno text, email_plain text, mobno_plain text)" >/dev/null
c "SELECT create_distributed_table('accounts', 'id')" >/dev/null
c "INSERT INTO accounts SELECT g, ekm_encrypt('acct' || g || '@example.com', 'accounts.email'), ekm_encrypt('+44' || lpad(g::text, 10, '0'), 'accounts.mobno'),
                               'acct' || g || '@example.com', '+44' || lpad(g::text, 10, '0') FROM generate_series(1, 100000) g" >/dev/null
c "CREATE TABLE regions (code text PRIMARY KEY, vault text, plain text)" >/dev/null
c "SELECT create_reference_table('regions')" >/dev/null
c "INSERT INTO regions SELECT 'r' || g, ekm_encrypt('region-' || g, 'regions'), 'region-' || g FROM generate_series(1, 1000) g" >/dev/null
check_match "6: a worker node refuses to register a Citus table itself (the coordinator does)" \
  "$(werr 1 "SELECT ekm_register_column('accounts', 'email', 'accounts.email')")" \
  "^ERROR:  55000: accounts is a Citus table and this is a worker node: its columns are registered on the coordinator HINT: "
check "6: the coordinator registers a distributed table's two columns" \
  "$(c "SELECT ekm_register_column('accounts', 'email', 'accounts.email'), ekm_register_column('accounts', 'mobno', 'accounts.mobno')")" \
  "registered accounts.email|registered accounts.mobno"
check "6: and a reference table's column" "$(c "SELECT ekm_register_column('regions', 'vault', 'regions')")" "registered regions.vault"
shards=$(c "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'accounts'::regclass")
on1=$(w 1 "SELECT count(*) FROM ekm.registered_column WHERE parent = 'accounts'::regclass AND col = 'email'")
on2=$(w 2 "SELECT count(*) FROM ekm.registered_column WHERE parent = 'accounts'::regclass AND col = 'email'")
check "6: every shard placement of the distributed table is registered on the node that holds it ($on1 + $on2)" "$((on1 + on2))/$((on1 > 0 && on2 > 0))" "$shards/1"
check "6: the reference table's placement is registered on every node that holds one" \
  "$(c "SELECT count(*) FROM ekm.registered_column WHERE parent = 'regions'::regclass")/$(w 1 "SELECT count(*) FROM ekm.registered_column WHERE parent = 'regions'::regclass")/$(w 2 "SELECT count(*) FROM ekm.registered_column WHERE parent = 'regions'::regclass")" \
  "$(c "SELECT count(*) FILTER (WHERE n.groupid = 0) || '/' || count(*) FILTER (WHERE n.nodeport = ${ports[1]}) || '/' || count(*) FILTER (WHERE n.nodeport = ${ports[2]}) FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid) JOIN pg_dist_node n USING (groupid) WHERE s.logicalrelid = 'regions'::regclass")"
from=$(c "SELECT key_id FROM ekm.keys WHERE is_active")
# worker node 1's job is held inside its first batch
dir=${base}1; port=${ports[1]}
pause_hold app batch
job=$(c "SELECT DISTINCT job_id FROM ekm_rotate(force => true) WHERE job_id IS NOT NULL")
to=$(c "SELECT to_key FROM ekm.rotation_job WHERE job_id = $job")
check_match "6: ekm_rotate() on the coordinator starts a job" "$job:$to" '^[0-9]+:key_'
check "6: worker node 1's part of it is held inside a batch" "$(paused_at app batch)" yes
nodes=""
for _ in $(seq 1 600); do
  nodes=$(c "SELECT string_agg(node || '=' || column_state, ',' ORDER BY node) FROM ekm.rotation_progress WHERE job_id = $job AND node IS NOT NULL")
  case $nodes in *"${ports[2]}=verified"*) break ;; esac; sleep 0.05
done
check "6: ekm.rotation_progress on the coordinator shows each node: node 2 verified, node 1 still running" \
  "$nodes" "127.0.0.1:${ports[1]}=running,127.0.0.1:${ports[2]}=verified"
check "6: the old key is rotating on every node meanwhile" \
  "$(w 0 "SELECT rotation_status FROM ekm.keys WHERE key_id = '$from'"):$(w 1 "SELECT rotation_status FROM ekm.keys WHERE key_id = '$from'"):$(w 2 "SELECT rotation_status FROM ekm.keys WHERE key_id = '$from'")" \
  rotating:rotating:rotating
# clients write through the coordinator: each committed value is recorded
rm -f "$base.writes"
writes() { # from to
  local i id
  for i in $(seq "$1" "$2"); do
    id=$(( (i * 37) % 500 + 1 ))
    cpsql "${base}0" "${ports[0]}" -d app -At -q -v ON_ERROR_STOP=1 -c "INSERT INTO accounts (id, email, email_plain) VALUES ($id, ekm_encrypt('w$i-$id', 'accounts.email'), 'w$i-$id')
        ON CONFLICT (id) DO UPDATE SET email = excluded.email, email_plain = excluded.email_plain" >/dev/null 2>&1 \
      && echo "$id w$i-$id" >>"$base.writes"
  done
}
writes 1 150
check "6: the writes through the coordinator commit while the rotation runs" "$(wc -l <"$base.writes")" 150
# worker node 1 restarts in the middle of its batch
cluster_stop "${base}1" immediate >/dev/null 2>&1
pause_release 2>/dev/null
# while it is down the coordinator's job waits and names it (Citus's own
# connectivity check tells a node it cannot reach from one whose call failed)
for _ in $(seq 1 600); do
  down=$(c "SELECT state FROM ekm.rotation_node WHERE job_id = $job AND node = '127.0.0.1:${ports[1]}'")
  [ "$down" = unreachable ] && break; sleep 0.05
done
check "6: while worker node 1 is down, its progress row says unreachable" "$down" unreachable
check_match "6: and the job, still running, waits for it by name" \
  "$(c "SELECT state || ': ' || coalesce(waiting_for, '') FROM ekm.rotation_job WHERE job_id = $job")" \
  "^running: .*worker node 127.0.0.1:${ports[1]} unreachable"
cluster_restart_only "${base}1" >/dev/null
writes 151 300
check "6: and after worker node 1 restarted" "$(wc -l <"$base.writes")" 300
check "6: the job ends done" "$(c "SELECT state FROM ekm_rotation_wait($job, 300)" | tail -n 1)" done
for n in 0 1 2; do
  check "6: node $n has the old key retired and the new one active" \
    "$(w "$n" "SELECT string_agg(rotation_status, ',' ORDER BY key_id = '$to') FROM ekm.keys WHERE key_id IN ('$from', '$to')")" retired,active
done
for n in 1 2; do
  check_match "6: node $n's part of the job is done (rows moved there)" \
    "$(w "$n" "SELECT state || ':' || (rows_done > 0) FROM ekm.rotation_job WHERE coordinator_job = $job")" '^done:true$'
done
j1=$(w 1 "SELECT job_id FROM ekm.rotation_job WHERE coordinator_job = $job")
check_match "6: node 1's part ($j1) resumed after its restart (its worker started again)" \
  "$(grep -c "rotation job $j1: worker started" "${base}1/server.log")" '^([2-9]|[1-9][0-9]+)$'
check "6: every shard placement holds only values on the new key (run on each placement)" \
  "$(c "SELECT sum(result::bigint) FROM run_command_on_placements('accounts', \$\$SELECT count(*) FROM %s WHERE ekm_key_id(email) IS DISTINCT FROM '$to' OR ekm_key_id(mobno) IS DISTINCT FROM '$to'\$\$)")" 0
check "6: every value decrypts through the coordinator to its shadow, on the new key" \
  "$(c "SELECT count(*) FROM accounts WHERE ekm_decrypt(email, 'accounts.email') = email_plain AND ekm_decrypt(mobno, 'accounts.mobno') = mobno_plain AND ekm_key_id(email) = '$to'")" 100000
check "6: every reference table placement is on the new key" \
  "$(c "SELECT sum(result::bigint) FROM run_command_on_placements('regions', \$\$SELECT count(*) FROM %s WHERE ekm_key_id(vault) IS DISTINCT FROM '$to'\$\$)"):$(c "SELECT count(*) FROM regions WHERE ekm_decrypt(vault, 'regions') = plain")" 0:1000
lost=$(sort -k1,1n -s "$base.writes" | awk '{last[$1] = $2} END {for (i in last) print i, last[i]}' | while read -r id v; do
  [ "$(c "SELECT ekm_decrypt(email, 'accounts.email') = '$v' AND email_plain = '$v' FROM accounts WHERE id = $id")" = t ] || echo "$id"; done | wc -l)
check "6: no write was lost: each row holds its last committed write" "$lost" 0
check "6: the coordinator's progress shows both nodes done" \
  "$(c "SELECT string_agg(column_state || ':' || percent, ',' ORDER BY node) FROM ekm.rotation_progress WHERE job_id = $job AND node IS NOT NULL")" "done:100.0,done:100.0"
# cancel and resume from the coordinator reach the nodes' jobs
dir=${base}2; port=${ports[2]}
pause_hold app batch
job2=$(c "SELECT DISTINCT job_id FROM ekm_rotate(force => true) WHERE job_id IS NOT NULL")
check "6: a second rotation: node 2's part held inside a batch" "$(paused_at app batch)" yes
check "6: ekm_rotation_cancel() on the coordinator" "$(c "SELECT ekm_rotation_cancel($job2)")" "rotation job $job2: running -> cancelled"
check "6: cancels node 2's part in the same transaction" "$(w 2 "SELECT state FROM ekm.rotation_job WHERE coordinator_job = $job2")" cancelled
pause_release
check "6: nothing retired anywhere" "$(w 2 "SELECT count(*) FROM ekm.keys WHERE rotation_status = 'rotating'"):$(c "SELECT count(*) FROM ekm.keys WHERE rotation_status = 'rotating'")" 1:1
check "6: ekm_rotation_resume() on the coordinator" "$(c "SELECT ekm_rotation_resume($job2)")" "rotation job $job2: cancelled -> running"
check "6: the resumed job ends done, node 2's part too" \
  "$(c "SELECT state FROM ekm_rotation_wait($job2, 300)" | tail -n 1):$(w 2 "SELECT state FROM ekm.rotation_job WHERE coordinator_job = $job2")" done:done
check "6: every value is on the second job's key" \
  "$(c "SELECT count(*) FROM accounts WHERE ekm_key_id(email) = (SELECT to_key FROM ekm.rotation_job WHERE job_id = $job2) AND ekm_decrypt(email, 'accounts.email') = email_plain")" 100000

# --- 7. cluster operations during a rotation -----------------------------------
# a fresh node 3 (the earlier one had keys of its own)
cluster_stop "${base}3" immediate >/dev/null 2>&1; rm -rf "${base}3"
start_node 3 "ekm.debug_pause_points = on" "ekm.rotation_retry_pause = 100" >/dev/null || not_ok "7: a fresh node 3 starts"
dir=${base}1; port=${ports[1]}
pause_hold app batch
from3=$(c "SELECT key_id FROM ekm.keys WHERE is_active")
job3=$(c "SELECT DISTINCT job_id FROM ekm_rotate(force => true) WHERE job_id IS NOT NULL")
to3=$(c "SELECT to_key FROM ekm.rotation_job WHERE job_id = $job3")
check "7: a third rotation: node 1's part held inside a batch" "$(paused_at app batch)" yes
for _ in $(seq 1 600); do
  [ "$(c "SELECT column_state FROM ekm.rotation_progress WHERE job_id = $job3 AND node = '127.0.0.1:${ports[2]}'")" = verified ] && break; sleep 0.05
done
check "7: node 2's part is verified" "$(c "SELECT column_state FROM ekm.rotation_progress WHERE job_id = $job3 AND node = '127.0.0.1:${ports[2]}'")" verified
on_node1() { c "SELECT s.shardid FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid) JOIN pg_dist_node n USING (groupid)
                WHERE s.logicalrelid = 'accounts'::regclass AND n.nodeport = ${ports[1]} ORDER BY 1 LIMIT 1"; }
on_old() { c "SELECT count(*) FROM accounts WHERE get_shard_id_for_distribution_column('accounts', id) = $1 AND ekm_key_id(email) = '$from3'"; }
s1=$(on_node1)
check_match "7: a shard of node 1 still holds values on the old key" "$(on_old "$s1")" '^[1-9][0-9]*$'
c "SELECT citus_move_shard_placement($s1, '127.0.0.1', ${ports[1]}, '127.0.0.1', ${ports[2]}, shard_transfer_mode => 'block_writes')" >/dev/null
check "7: it moves to node 2 (verified already) during the rotation" \
  "$(c "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) WHERE p.shardid = $s1")" "${ports[2]}"
c "SELECT citus_add_node('127.0.0.1', ${ports[3]})" >/dev/null
# (Citus copies the reference tables to a new node first: their placements
# there arrive during the rotation too)
check "7: the reference tables are copied to the added node" "$(c "SELECT replicate_reference_tables('block_writes')")" ""
s2=$(on_node1)
moved=$(c "SELECT citus_move_shard_placement($s2, '127.0.0.1', ${ports[1]}, '127.0.0.1', ${ports[3]}, shard_transfer_mode => 'block_writes')")
check "7: a node added during the rotation receives another one" \
  "$moved$(c "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) WHERE p.shardid = $s2"):$(on_old "$s2" | grep -c '^[1-9]')" "${ports[3]}:1"
pause_release
check "7: the job ends done" "$(c "SELECT state FROM ekm_rotation_wait($job3, 300)" | tail -n 1)" done
check "7: the added node got the coordinator's keys from the job (old retired, new active)" "$(keys_of 3)" "$(keys_of 0)"
check "7: and its part of the job is done" "$(w 3 "SELECT state FROM ekm.rotation_job WHERE coordinator_job = $job3")" done
check "7: both moved shards are on the new key" "$(on_old "$s1"):$(on_old "$s2")" 0:0
check "7: every placement of both tables, on every node, is on the new key" \
  "$(c "SELECT sum(result::bigint) FROM run_command_on_placements('accounts', \$\$SELECT count(*) FROM %s WHERE ekm_key_id(email) IS DISTINCT FROM '$to3' OR ekm_key_id(mobno) IS DISTINCT FROM '$to3'\$\$)"):$(c "SELECT sum(result::bigint) FROM run_command_on_placements('regions', \$\$SELECT count(*) FROM %s WHERE ekm_key_id(vault) IS DISTINCT FROM '$to3'\$\$)")" 0:0
check "7: and every value decrypts through the coordinator to its shadow" \
  "$(c "SELECT count(*) FROM accounts WHERE ekm_decrypt(email, 'accounts.email') = email_plain AND ekm_decrypt(mobno, 'accounts.mobno') = mobno_plain")" 100000

# --- 8. a value a worker node cannot move -------------------------------------
c "INSERT INTO accounts (id, email, email_plain) VALUES (77, ekm_encrypt('bad77', 'another.context'), 'bad77')
   ON CONFLICT (id) DO UPDATE SET email = excluded.email, email_plain = excluded.email_plain" >/dev/null
from4=$(c "SELECT key_id FROM ekm.keys WHERE is_active")
job4=$(c "SELECT DISTINCT job_id FROM ekm_rotate(force => true) WHERE job_id IS NOT NULL")
check "8: a rotation with a value no context of its column opens ends failed" "$(c "SELECT state FROM ekm_rotation_wait($job4, 300)" | tail -n 1)" failed
check_match "8: its error names the worker node, what is wrong there and what to do" \
  "$(c "SELECT error FROM ekm.rotation_job WHERE job_id = $job4")" \
  "^worker node 127\.0\.0\.1:[0-9]+: its part of the job needs attention: 1 values could not be moved .*ekm_rotation_resume\($job4\) on the coordinator$"
check "8: nothing is retired on any node" \
  "$(for n in 0 1 2 3; do w "$n" "SELECT rotation_status FROM ekm.keys WHERE key_id = '$from4'"; done | sort -u)" rotating
c "INSERT INTO accounts (id, email, email_plain) VALUES (77, ekm_encrypt('fixed77', 'accounts.email'), 'fixed77')
   ON CONFLICT (id) DO UPDATE SET email = excluded.email, email_plain = excluded.email_plain" >/dev/null
check "8: once fixed, ekm_rotation_resume on the coordinator" "$(c "SELECT ekm_rotation_resume($job4)")" "rotation job $job4: failed -> running"
check "8: resumes the node's part and the job ends done" "$(c "SELECT state FROM ekm_rotation_wait($job4, 300)" | tail -n 1)" done
check "8: every value is on the new key, the fixed one too" \
  "$(c "SELECT count(*) FROM accounts WHERE ekm_key_id(email) = (SELECT to_key FROM ekm.rotation_job WHERE job_id = $job4) AND ekm_decrypt(email, 'accounts.email') = email_plain")" 100000

# a shard moves after every node's final check, before the retire
dir=${base}0; port=${ports[0]}
pause_hold app retire
job5=$(c "SELECT DISTINCT job_id FROM ekm_rotate(force => true) WHERE job_id IS NOT NULL")
to5=$(c "SELECT to_key FROM ekm.rotation_job WHERE job_id = $job5")
check "8: a rotation held at its retire (every node checked)" "$(paused_at app retire)" yes
s3=$(on_node1)
check "8: a shard moves from node 1 to node 2 meanwhile" \
  "$(c "SELECT citus_move_shard_placement($s3, '127.0.0.1', ${ports[1]}, '127.0.0.1', ${ports[2]}, shard_transfer_mode => 'block_writes')")" ""
pause_release
check "8: the job ends done" "$(c "SELECT state FROM ekm_rotation_wait($job5, 300)" | tail -n 1)" done
check_match "8: node 2 refused the first retire (a placement arrived since its check) and the job waited" \
  "$(grep -c "rotation job $job5: waiting: a worker node: .*has not verified its part of the rotation: .*a shard placement arrived on this node since its check" "${base}0/server.log")" '^[1-9]'
check "8: every placement is on the new key" \
  "$(c "SELECT sum(result::bigint) FROM run_command_on_placements('accounts', \$\$SELECT count(*) FROM %s WHERE ekm_key_id(email) IS DISTINCT FROM '$to5' OR ekm_key_id(mobno) IS DISTINCT FROM '$to5'\$\$)")" 0
# ekm_rollback() on the coordinator: the previous key is active again on
# every node and every node's part moves the values back to it
rb=$(c "SELECT job_id || ' ' || to_key FROM ekm_rollback()")
jobrb=${rb%% *}; prev=${rb#* }
check "8: ekm_rollback() on the coordinator ends done" "$(c "SELECT state FROM ekm_rotation_wait($jobrb, 300)" | tail -n 1)" done
check "8: every node's part of it was a rollback, done" \
  "$(for n in 1 2 3; do w "$n" "SELECT kind || ':' || state FROM ekm.rotation_job WHERE coordinator_job = $jobrb"; done | sort -u)" rollback:done
check "8: every placement is back on the previous key, active again on every node" \
  "$(c "SELECT sum(result::bigint) FROM run_command_on_placements('accounts', \$\$SELECT count(*) FROM %s WHERE ekm_key_id(email) IS DISTINCT FROM '$prev' OR ekm_key_id(mobno) IS DISTINCT FROM '$prev'\$\$)"):$(for n in 0 1 2 3; do w "$n" "SELECT rotation_status FROM ekm.keys WHERE key_id = '$prev'"; done | sort -u)" 0:active

# --- 9. destroying keys across the nodes ----------------------------------------
retired=$(c "SELECT count(*) FROM ekm.keys WHERE rotation_status = 'retired'")
check_match "9: before the worker nodes scanned, cleanup keeps every retired key, naming a node that has not" \
  "$(c "SELECT count(*) FILTER (WHERE action LIKE 'kept:%on worker node 127.0.0.1:%no scan of the database has run since it was retired%') || '/' || count(*) FROM ekm_cleanup_old_keys(0)")" \
  "^$retired/$retired\$"
# (the old placements of the shards moved above hold values as they were
# when they moved: Citus drops them in the background; here, now)
c "CALL citus_cleanup_orphaned_resources()" >/dev/null
note=$(c "SELECT note FROM ekm_scan_database()")
check_match "9: ekm_scan_database() on the coordinator starts a scan on every worker node" "$note" \
  "each worker node scans its own database .*: 127.0.0.1:${ports[1]} job [0-9]+, 127.0.0.1:${ports[2]} job [0-9]+, 127.0.0.1:${ports[3]} job [0-9]+$"
c "SELECT state FROM ekm_rotation_wait((SELECT max(job_id) FROM ekm.rotation_job WHERE kind = 'scan'), 120)" >/dev/null
for n in 1 2 3; do
  for _ in $(seq 1 1200); do
    [ "$(w "$n" "SELECT state FROM ekm.rotation_job WHERE kind = 'scan' ORDER BY job_id DESC LIMIT 1")" = done ] && break; sleep 0.05
  done
done
check "9: and each ends done" "$(for n in 1 2 3; do w "$n" "SELECT state FROM ekm.rotation_job WHERE kind = 'scan' ORDER BY job_id DESC LIMIT 1"; done | sort -u)" done
cluster_stop "${base}3" >/dev/null
check_match "9: with a worker node down, cleanup keeps every key (the node may hold values)" \
  "$(c "SELECT count(*) FILTER (WHERE action LIKE 'kept:%worker node 127.0.0.1:${ports[3]} could not be checked%') FROM ekm_cleanup_old_keys(0)")" "^$retired\$"
check_match "9: even with force => true (a node that was not asked may hold values)" \
  "$(c "SELECT count(*) FILTER (WHERE action LIKE 'kept:%worker node 127.0.0.1:${ports[3]} could not be checked%') FROM ekm_cleanup_old_keys(0, dry_run => true, force => true)")" "^$retired\$"
cluster_restart_only "${base}3" >/dev/null
k0=${k0%%:*}
res=$(c "SELECT string_agg(key_id || '=' || split_part(action, ':', 1), ',' ORDER BY key_id) FROM ekm_cleanup_old_keys(0)")
check_match "9: the first key, whose values are in unregistered columns of the shards, is kept" "$res" "(^|,)$k0=kept(,|$)"
check_match "9: naming the worker node and the shard where its scan found them" \
  "$(c "SELECT action FROM ekm_cleanup_old_keys(0, dry_run => true) WHERE key_id = '$k0'")" \
  "^kept: .*on worker node 127\.0\.0\.1:[0-9]+, the scan of the database finished .* found values on it in [a-z_.]*(people|contacts|branches)_[0-9]+"
check "9: keys no node has values on are destroyed (4 here)" "$(echo "$res" | tr ',' '\n' | grep -c '=destroyed$')" 4
for n in 1 2 3; do
  check "9: node $n has the same keys in the same states (destroyed ones too)" "$(keys_of "$n"):$(digest_of "$n")" "$(keys_of 0):$(digest_of 0)"
done
check "9: the destroyed keys' material is erased on every node" \
  "$(for n in 0 1 2 3; do w "$n" "SELECT count(*) FROM ekm.key_material m JOIN ekm.key k USING (key_id) WHERE k.rotation_status = 'destroyed' AND m.wrapped IS NOT NULL"; done | sort -u)" 0
check "9: every registered value still decrypts through the coordinator" \
  "$(c "SELECT count(*) FROM accounts WHERE ekm_decrypt(email, 'accounts.email') = email_plain")" 100000
check "9: and no value anywhere is on a destroyed key (the unregistered ones are on kept keys)" \
  "$(c "SELECT count(*) FROM people WHERE ekm_key_id(email) IN (SELECT key_id FROM ekm.keys WHERE rotation_status = 'destroyed')")/$(c "SELECT count(*) FROM people WHERE ekm_key_id(email) IN (SELECT key_id FROM ekm.keys WHERE rotation_status = 'retired')")" 0/100000

# --- 10. the master key rotated on the cluster ---------------------------------
python3 -c "import os, sys; sys.stdout.write(os.urandom(32).hex())" >"$base.key/new.key"
chmod 600 "$base.key/new.key"
[ "$(id -u)" -eq 0 ] && chown -R "$EKM_PG_USER" "$base.key"
# node N loads the new master key, the old one as the previous (restarted:
# every session there has both)
new_mk() {
  printf "ekm.master_key_file = '%s'\nekm.previous_master_key_file = '%s'\n" "$base.key/new.key" "$base.key/master.key" \
    | as_pg tee -a "$base$1/data/postgresql.conf" >/dev/null
  cluster_stop "$base$1" >/dev/null; cluster_restart_only "$base$1" >/dev/null
}
# (the keys with material: a destroyed key keeps the check value it had)
fps() { for n in 0 1 2 3; do w "$n" "SELECT string_agg(DISTINCT master_key_fingerprint, ',') FROM ekm.keys WHERE rotation_status <> 'destroyed'"; done | sort -u | tr '\n' ' '; }
old_fp=$(fps)
check_match "10: before: every node's keys are wrapped under one master key" "$old_fp" '^[0-9a-f]+ $'
for n in 0 1 2; do new_mk "$n"; done
out=$(c "SELECT count(*) FROM ekm_rotate_master_key()")
check_match "10: with worker node 3 still on the old master key, the rotation on the coordinator is refused, naming the node" \
  "$(echo "$out" | tr '\n' ' ')" "^ERROR:  the coordinator's key key_[0-9_a-f]+ is wrapped under master key [0-9a-f]+, which worker node 127\.0\.0\.1:${ports[3]} does not load \(it loads [0-9a-f]+\).* HINT:  configure master key"
check "10: and nothing changed on any node" "$(fps)" "$old_fp"
new_mk 3
check_match "10: once every node loads the new master key, ekm_rotate_master_key() on the coordinator re-wraps every key" \
  "$(c "SELECT count(*) FILTER (WHERE action = 're-wrapped') || '/' || count(*) FROM ekm_rotate_master_key()")" '^([1-9][0-9]*)/\1$'
new_fp=$(fps)
check_match "10: every node's keys are now wrapped under the new master key, the same on every node" "$new_fp" '^[0-9a-f]+ $'
check "10: which is another one" "$([ "$new_fp" != "$old_fp" ] && echo yes)" yes
for n in 1 2 3; do
  check "10: node $n has the coordinator's catalog" "$(digest_of "$n")" "$(digest_of 0)"
done
check "10: ekm_health() on the coordinator: every node has the same keys and unwraps them" \
  "$(c "SELECT status FROM ekm_health() WHERE \"check\" = 'citus_nodes'")" ok
# the previous master key removed everywhere: only the new one loads
for n in 0 1 2 3; do
  echo "ekm.previous_master_key_file = ''" | as_pg tee -a "$base$n/data/postgresql.conf" >/dev/null
  cluster_stop "$base$n" >/dev/null; cluster_restart_only "$base$n" >/dev/null
done
check "10: with only the new master key configured, every value decrypts through the coordinator (new sessions)" \
  "$(c "SELECT count(*) FROM accounts WHERE ekm_decrypt(email, 'accounts.email') = email_plain")" 100000
check "10: and a new key reaches every node" \
  "$(c "SELECT ekm_activate_key(ekm_create_key()) IS NOT NULL"):$(keys_of 3)" "t:$(keys_of 0)"

# --- 11. a partitioned distributed table ----------------------------------------
c "CREATE TABLE events (tenant int, month int, secret text, plain text, PRIMARY KEY (tenant, month)) PARTITION BY RANGE (month)" >/dev/null
c "CREATE TABLE events_h1 PARTITION OF events FOR VALUES FROM (1) TO (7)" >/dev/null
c "CREATE TABLE events_h2 PARTITION OF events FOR VALUES FROM (7) TO (13)" >/dev/null
c "SELECT create_distributed_table('events', 'tenant')" >/dev/null
c "INSERT INTO events SELECT g, m, ekm_encrypt('e' || g || '-' || m, 'events'), 'e' || g || '-' || m FROM generate_series(1, 500) g, generate_series(1, 12) m" >/dev/null
check_match "11: ekm_register_column on a partitioned distributed table registers it" \
  "$(c "SELECT ekm_register_column('events', 'secret', 'events')")" '^registered'
for n in 1 2; do
  check_match "11: worker node $n registers its placements of both partitions, with the partitioned table" \
    "$(w "$n" "SELECT count(*) FILTER (WHERE tbl::text LIKE 'events_h1_%') || ':' || count(*) FILTER (WHERE tbl::text LIKE 'events_h2_%') FROM ekm.registered_column WHERE parent = 'events'::regclass")" '^[1-9][0-9]*:[1-9][0-9]*$'
done
# a partition added after the registration (Citus distributes it), with rows
c "CREATE TABLE events_h3 PARTITION OF events FOR VALUES FROM (13) TO (19)" >/dev/null
c "INSERT INTO events SELECT g, 13, ekm_encrypt('e' || g || '-13', 'events'), 'e' || g || '-13' FROM generate_series(1, 500) g" >/dev/null
job=$(c "SELECT DISTINCT job_id FROM ekm_rotate(force => true)")
check "11: a rotation through the coordinator ends done" "$(c "SELECT state FROM ekm_rotation_wait($job, 300)" | tail -n 1)" done
to=$(c "SELECT key_id FROM ekm.keys WHERE rotation_status = 'active'")
for p in events_h1 events_h2 events_h3; do
  check "11: every placement of partition $p holds only values on the new key" \
    "$(c "SELECT sum(result::bigint) FROM run_command_on_placements('$p', \$\$SELECT count(*) FROM %s WHERE ekm_key_id(secret) IS DISTINCT FROM '$to'\$\$)")" 0
done
check "11: every value decrypts through the coordinator to its shadow" \
  "$(c "SELECT count(*) FROM events WHERE ekm_decrypt(secret, 'events') = plain AND ekm_key_id(secret) = '$to'")" 6500

# --- 5. the server logs ------------------------------------------------------------
wrapped=$(cpsql "${base}0" "${ports[0]}" -d app -At -q -c "SELECT string_agg(encode(wrapped, 'hex'), ' ') FROM ekm.key_material")
leaks=0
for n in 0 1 2 3; do
  for h in $wrapped; do grep -q -- "${h:0:32}" "$base$n/server.log" && leaks=$((leaks + 1)); done
  grep -q -- 'user4242@example.com' "$base$n/server.log" && leaks=$((leaks + 1))
  grep -q -- 'acct4242@example.com' "$base$n/server.log" && leaks=$((leaks + 1))
done
check "5: no node's server log holds wrapped key material or a plaintext" "$leaks" 0
for n in 0 1 2 3; do check_log_clean "$base$n/server.log"; done
tap_done
