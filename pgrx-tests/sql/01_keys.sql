-- Keys: the first key, metadata, status, lifecycle guards, audit.
\pset null '(null)'

-- CREATE EXTENSION made exactly one key, active.
SELECT count(*) AS keys, count(*) FILTER (WHERE is_active) AS active,
       bool_and(key_id ~ '^key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}$') AS readable_id
FROM ekm.keys;
SELECT rotation_status, is_active, age_days, expires_in_days, needs_rotation,
       expires_at = created_at + interval '90 days' AS lifetime_90d,
       rotation_due_at = created_at + interval '76 days' AS due_at_76d,
       encryptions
FROM ekm.keys;

-- The view shows metadata only.
SELECT column_name FROM information_schema.columns
WHERE table_schema = 'ekm' AND table_name = 'keys' ORDER BY ordinal_position;

-- Status, as the runbook's get_key_status().
SELECT current_key_id = (SELECT key_id FROM ekm.keys WHERE is_active) AS current_is_active,
       active_keys_count, decrypt_keys_count, keys_with_material, keys_needing_rotation,
       current_key_age_days, next_rotation_due - rotation_alert_at AS alert_window,
       master_key_source LIKE 'development default (%ekm_dev_master.key)' AS dev_default
FROM ekm_key_status();

-- A created key does nothing until activated.
SELECT ekm_create_key() AS k2 \gset
SELECT key_id = :'k2' AS is_new, rotation_status, is_active FROM ekm.keys WHERE key_id = :'k2';
SELECT ekm_encrypt('before') AS ct1 \gset
SELECT ekm_key_id(:'ct1') <> :'k2' AS still_on_first_key;

-- Activation: the new key encrypts, the old one becomes rotating and still decrypts.
SELECT ekm_activate_key(:'k2') = :'k2' AS activated;
SELECT rotation_status, count(*) FROM ekm.keys GROUP BY 1 ORDER BY 1;
SELECT ekm_key_id(ekm_encrypt('after')) = :'k2' AS new_writes_on_new_key,
       ekm_decrypt(:'ct1') AS old_value_still_decrypts;
SELECT ekm_activate_key(:'k2') = :'k2' AS activating_active_key_is_a_no_op;
SELECT active_keys_count, decrypt_keys_count, keys_with_material FROM ekm_key_status();

-- Encryptions are counted per key (shared memory, no table write per call).
SELECT encryptions >= 1 AS counted FROM ekm.keys WHERE key_id = :'k2';

-- Refusals, each with its SQLSTATE.
SELECT try_hint($$SELECT ekm_activate_key('nope')$$);
SELECT try_hint($$SELECT ekm_activate_key('key_20200101_000000_0000')$$);

-- Not a refusal: ekm_activate_key is STRICT (NULL in, NULL out, nothing changed).
SELECT ekm_activate_key(NULL) IS NULL AS strict_null, count(*) FILTER (WHERE is_active) AS active_keys FROM ekm.keys;

-- The database enforces the lifecycle, even for a superuser editing rows.
SELECT try_hint($$UPDATE ekm.key SET rotation_status = 'destroyed' WHERE is_active$$);
SELECT try($$UPDATE ekm.key SET rotation_status = 'created' WHERE is_active$$);
SELECT try($$UPDATE ekm.key SET key_id = 'key_20200101_000000_0000' WHERE is_active$$);
SELECT try($$UPDATE ekm.key SET rotation_status = 'active' WHERE NOT is_active$$);
SELECT try($$UPDATE ekm.key SET rotation_status = 'bogus'$$);
SELECT try($$UPDATE ekm.key SET is_active = true$$);
-- exactly one active key at commit
BEGIN;
SELECT try($$UPDATE ekm.key SET rotation_status = 'rotating' WHERE is_active$$);
SELECT try('SET CONSTRAINTS ALL IMMEDIATE');
ROLLBACK;
SELECT count(*) FILTER (WHERE is_active) AS still_one_active FROM ekm.keys;

-- Every key event is in the audit log, with who did it.
SELECT event, key_id IS NOT NULL AS has_key, acting_role, session_role,
       detail - 'master_key_source' AS detail
FROM ekm.audit_log ORDER BY id;
