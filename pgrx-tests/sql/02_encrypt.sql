-- Field encryption: round trips, format, context, and every bad input.
\pset null '(null)'

SELECT ekm_encrypt('alice.smith@example.co.uk') AS ct \gset
SELECT ekm_decrypt(:'ct') AS plaintext,
       left(:'ct', 5) AS prefix,
       length(:'ct') AS len_25_bytes,
       length(:'ct') <= 0.6 * 156 AS within_60pct_of_fernet,
       :'ct' ~ '^ekm1:[A-Za-z0-9_-]+$' AS text_safe,
       ekm_key_id(:'ct') = (SELECT key_id FROM ekm.keys WHERE is_active) AS names_active_key,
       ekm_is_encrypted(:'ct') AS is_encrypted,
       ekm_is_encrypted('alice@example.com') AS plaintext_is_not;

-- Fresh nonce per value: the same plaintext never gives the same ciphertext.
SELECT count(DISTINCT ekm_encrypt('same')) AS distinct_ciphertexts FROM generate_series(1, 100);

-- NULL in, NULL out; empty string; non-ASCII; multi-megabyte values.
SELECT ekm_encrypt(NULL) AS enc_null, ekm_decrypt(NULL) AS dec_null,
       ekm_encrypt(NULL, 'ctx') AS enc_null_ctx, ekm_decrypt(NULL, 'ctx') AS dec_null_ctx,
       ekm_key_id(NULL) AS key_null, ekm_reencrypt(NULL) AS reenc_null;
SELECT ekm_decrypt(ekm_encrypt('')) = '' AS empty_round_trips, length(ekm_encrypt('')) AS empty_len;
SELECT ekm_decrypt(ekm_encrypt('Zürich ✓ 東京')) AS unicode;
SELECT md5(ekm_decrypt(ekm_encrypt(v))) = md5(v) AS big_round_trips, length(v) AS bytes
FROM (SELECT repeat('0123456789abcdef', 250000) AS v) s;

-- Values in a table, through a parallel plan too.
CREATE TABLE people (id int PRIMARY KEY, email text, mobno text);
INSERT INTO people
SELECT g, ekm_encrypt('user' || g || '@example.com', 'public.people.email'), ekm_encrypt('+9198765' || lpad(g::text, 5, '0'))
FROM generate_series(1, 2000) g;
SELECT count(*) FILTER (WHERE ekm_decrypt(email, 'public.people.email') = 'user' || id || '@example.com'
                          AND ekm_decrypt(mobno) = '+9198765' || lpad(id::text, 5, '0')) AS all_decrypt
FROM people;
SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
-- (force_parallel_mode is debug_parallel_query from PostgreSQL 16 on)
SELECT set_config(CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END, 'on', false) AS parallel_forced;
SELECT count(*) FILTER (WHERE ekm_decrypt(email, 'public.people.email') LIKE 'user%') AS parallel_decrypt FROM people;
SELECT set_config(CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END, 'off', false) AS parallel_forced;
RESET parallel_setup_cost; RESET parallel_tuple_cost; RESET min_parallel_table_scan_size;

-- ekm_key_id is immutable, so it can be indexed.
CREATE INDEX people_email_key ON people (ekm_key_id(email));
SELECT count(*) AS on_active_key FROM people WHERE ekm_key_id(email) = (SELECT key_id FROM ekm.keys WHERE is_active);

-- Context binds a value to where it belongs.
SELECT ekm_decrypt(ekm_encrypt('x', 'a'), 'a') AS same_context,
       ekm_decrypt(ekm_encrypt('x', NULL)) AS null_context_is_none,
       ekm_decrypt(ekm_encrypt('x'), '') AS empty_context_is_none;
SELECT try_hint($$SELECT ekm_decrypt(email, 'public.people.mobno') FROM people WHERE id = 1$$) AS moved_to_other_column;
SELECT try($$SELECT ekm_decrypt(email) FROM people WHERE id = 1$$) AS context_missing;

-- Re-encryption: same plaintext under the active key, never the plaintext.
SELECT ekm_create_key() AS k_new \gset
SELECT ekm_activate_key(:'k_new') IS NOT NULL AS activated;
SELECT ekm_reencrypt(email, 'public.people.email') AS re FROM people WHERE id = 7 \gset
SELECT ekm_key_id(:'re') = :'k_new' AS on_new_key,
       ekm_decrypt(:'re', 'public.people.email') AS plaintext,
       :'re' NOT LIKE '%user7%' AS no_plaintext;
SELECT ekm_reencrypt(:'re', 'public.people.email') = :'re' AS already_current_is_unchanged;
SELECT try($$SELECT ekm_reencrypt(email, 'wrong') FROM people WHERE id = 7$$) AS reencrypt_checks_context;

-- Bad input: an ERROR with a specific SQLSTATE naming the cause, never a crash.
SELECT try_hint($$SELECT ekm_decrypt('alice@example.com')$$) AS not_ours;
SELECT try($$SELECT ekm_decrypt('')$$) AS empty_string;
SELECT try($$SELECT ekm_decrypt('FERNET_V2:key_20250927_153045_b7c2:gAAAAABk')$$) AS fernet;
SELECT try_hint($$SELECT ekm_decrypt('ekm2:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')$$) AS future_version;
SELECT try($$SELECT ekm_decrypt('ekm1:')$$) AS empty_body;
SELECT try($$SELECT ekm_decrypt(left(email, 30)) FROM people WHERE id = 1$$) AS truncated;
SELECT try($$SELECT ekm_decrypt(left(email, length(email) - 1), 'public.people.email') FROM people WHERE id = 1$$) AS one_char_short;
SELECT try($$SELECT ekm_decrypt(email || 'A', 'public.people.email') FROM people WHERE id = 1$$) AS one_char_long;
SELECT try($$SELECT ekm_decrypt('ekm1:' || repeat('*', 60))$$) AS bad_base64;
-- tampered: flip one character of the ciphertext body
SELECT try($$SELECT ekm_decrypt(overlay(email placing (CASE WHEN substr(email, 40, 1) = 'A' THEN 'B' ELSE 'A' END) from 40 for 1), 'public.people.email') FROM people WHERE id = 1$$) AS tampered;
-- a well-formed value naming a key this database never had
SELECT try_hint($$SELECT ekm_decrypt('ekm1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')$$) AS unknown_key;
SELECT try($$SELECT ekm_key_id('plain')$$) AS key_id_of_plaintext;
SELECT ekm_key_id('ekm1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA') AS key_id_needs_no_lookup;

-- Keys that may not decrypt: retired, destroyed (superuser edits stand in
-- for rotation and cleanup, which move the data first).
SELECT ekm_encrypt('on k_new') AS ct_new \gset
SELECT ekm_create_key() AS k3 \gset
SELECT ekm_activate_key(:'k3') IS NOT NULL AS activated;
UPDATE ekm.key SET rotation_status = 'retired', retired_at = now() WHERE key_id = :'k_new';
SELECT try_hint(format('SELECT ekm_decrypt(%L)', :'ct_new')) AS retired_key;
UPDATE ekm.key SET rotation_status = 'destroyed', destroyed_at = now() WHERE key_id = :'k_new';
UPDATE ekm.key_material SET wrapped = NULL WHERE key_id = :'k_new';
SELECT try_hint(format('SELECT ekm_decrypt(%L)', :'ct_new')) AS destroyed_key;
SELECT try(format('SELECT ekm_activate_key(%L)', :'k_new')) AS destroyed_cannot_come_back;
-- a retired key can be made active again (the runbook's rollback)
SELECT ekm_encrypt('on k3') AS ct3 \gset
SELECT ekm_create_key() AS k4 \gset
SELECT ekm_activate_key(:'k4') IS NOT NULL AS activated;
UPDATE ekm.key SET rotation_status = 'retired' WHERE key_id = :'k3';
SELECT ekm_activate_key(:'k3') = :'k3' AS reactivated;
SELECT ekm_decrypt(:'ct3') AS decrypts_again;
DROP TABLE people;
