-- Adopting the runbook's Fernet data: imported keys (wrapped under the
-- master key, decrypt only) read FERNET_V2:<key_id>:<token> values and bare
-- tokens. K1 is the Fernet specification's key (github.com/fernet/spec,
-- verify.json); K2's token was made with Python's cryptography package.
\pset null '(null)'
SET client_min_messages = warning;
-- Before any import, Fernet values are another scheme's: not decryptable.
SELECT try($$SELECT ekm_decrypt('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==')$$) AS before_import;
SELECT ekm_import_fernet_key('key_20250927_abc123', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=', created_at => '2025-09-27 00:00:00+00');
SELECT ekm_import_fernet_key('key_20251101_def456', 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=', created_at => '2025-11-01 00:00:00+00');
SELECT key_id, kind, rotation_status, is_active, created_at, master_key_fingerprint IS NOT NULL AS wrapped
FROM ekm.keys WHERE kind = 'fernet' ORDER BY key_id;
-- the key text is stored nowhere: the audit names the import, not the key
SELECT event, key_id, detail->>'state' AS state, detail::text LIKE '%cw_0x%' OR detail::text LIKE '%AAECAwQF%' AS holds_key
FROM ekm.audit_log WHERE event = 'fernet_key_imported' ORDER BY key_id;
SELECT count(*) AS key_text_in_material FROM ekm.key_material WHERE position(convert_to('cw_0x689RpI', 'UTF8') IN wrapped) > 0;

-- Reading: FERNET_V2 by key id (the context is ignored: Fernet has none), bare tokens with every key, newest first.
SELECT ekm_decrypt('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==') AS v2,
       ekm_decrypt('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==', 'public.people.email') AS v2_with_context,
       ekm_decrypt('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==') AS bare_k1,
       ekm_decrypt('gAAAAABrDH1aPbqrfsOmPPETzX3qvd3_Y8SiWiTj8CpygVmD2PJWV6tHKVdpDJa5NNlBinZXxEirzwUnxHvLiIYxH17LBTBZ2CsCOaw7tN-KW4NPWjM_cno=') AS bare_k2_non_ascii,
       ekm_decrypt('FERNET_V2:key_20251101_def456:gAAAAABrDH1aebY3EcguejabLz6NfwcM42TxHDmAo1Q82O67qvvV0ln6Ksy6EpdhjL8_s3TOkUb2dX_VccMvli2dui837ZZ_IQ==') = '' AS empty_string;
SELECT ekm_key_id('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==') AS v2_key,
       ekm_key_id('gAAAAABrDH1aPbqrfsOmPPETzX3qvd3_Y8SiWiTj8CpygVmD2PJWV6tHKVdpDJa5NNlBinZXxEirzwUnxHvLiIYxH17LBTBZ2CsCOaw7tN-KW4NPWjM_cno=') AS bare_key,
       ekm_is_encrypted('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==') AS v2_encrypted,
       ekm_is_encrypted('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==') AS bare_encrypted,
       ekm_is_encrypted('gAAAAA is how a token starts') AS prose;
-- the token's time, for audits (1985-10-26T01:20:00-07:00 in the spec)
SELECT ekm_fernet_token_time('gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==') AT TIME ZONE 'UTC' AS made_at,
       ekm_fernet_token_time('not fernet') AS not_fernet;

-- Errors, with the SQLSTATEs of ekm's own ciphertexts.
SELECT try_hint($$SELECT ekm_decrypt('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykQUFBQUFBQUFBQQ==')$$) AS tampered;
SELECT try($$SELECT ekm_decrypt('FERNET_V2:key_20251101_def456:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==')$$) AS wrong_key;
SELECT try($$SELECT ekm_decrypt('FERNET_V2:key_never_imported:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==')$$) AS unknown_key_id;
SELECT try($$SELECT ekm_decrypt('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPA==')$$) AS too_short;
SELECT try($$SELECT ekm_decrypt('FERNET_V2:key_20250927_abc123:%%%%%%%%%%%%%AECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykRtfsH-p1YsUD2Q==')$$) AS not_base64;
SELECT try($$SELECT ekm_decrypt('gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykQUFBQUFBQUFBQQ==')$$) AS bare_no_key_verifies;

-- Import refusals: each with its SQLSTATE; nothing is imported by them.
SELECT try_hint($$SELECT ekm_import_fernet_key('key_20250927_abc123', 'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=')$$) AS duplicate_id;
SELECT try_hint($$SELECT ekm_import_fernet_key('key_copy', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=')$$) AS same_key_other_id;
SELECT try_hint($$SELECT ekm_import_fernet_key('key_short', 'cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpw=')$$) AS short_key;
SELECT try_hint($$SELECT ekm_import_fernet_key('key_garbage', 'this is not a key')$$) AS not_a_key;
SELECT try_hint($$SELECT ekm_import_fernet_key('bad:id', 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=')$$) AS id_with_colon;
SELECT try_hint($$SELECT ekm_import_fernet_key('key_new', 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=', state => 'active')$$) AS never_active;
SELECT try_hint(format('SELECT ekm_import_fernet_key(%L, %L)', (SELECT key_id FROM ekm.keys WHERE is_active), 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=')) AS ekm_key_id_taken;
SELECT try_hint($$SELECT ekm_activate_key('key_20250927_abc123')$$) AS activate_imported;
SELECT try($$UPDATE ekm.key SET rotation_status = 'active' WHERE key_id = 'key_20251101_def456'$$) AS hand_activation;
SELECT count(*) AS fernet_keys FROM ekm.keys WHERE kind = 'fernet';

-- Many at once, from the runbook's key rows (all or nothing).
SELECT * FROM ekm_import_fernet_keys('[{"key_id": "key_a", "key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "created_at": "2025-01-01", "rotation_status": "retired"},
                                       {"key_id": "key_b", "key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=", "created_at": "2025-03-01T10:00:00Z", "rotation_status": "active"}]');
SELECT try_hint($$SELECT * FROM ekm_import_fernet_keys('[{"key_id": "key_c", "key": "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="}, {"key_id": "key_d"}]')$$) AS missing_key;
SELECT key_id, rotation_status, created_at FROM ekm.keys WHERE kind = 'fernet' AND key_id IN ('key_a', 'key_b', 'key_c') ORDER BY key_id;
-- a retired imported key does not decrypt (as for ekm's keys)
SELECT try($$SELECT ekm_decrypt('FERNET_V2:key_a:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==')$$) AS on_retired_key;


-- Bad input, each a clear error: NULL arguments, the arguments swapped (the
-- key is not echoed as an id), dates out of range, a FERNET_V2 id that ekm
-- could never have imported (not named back in the error).
SELECT try($$SELECT ekm_import_fernet_key(NULL, 'BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=')$$) AS null_id;
SELECT try($$SELECT ekm_import_fernet_key('key_x', NULL)$$) AS null_key;
SELECT try($$SELECT ekm_import_fernet_key('key_x', 'BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=', state => NULL)$$) AS null_state;
SELECT try($$SELECT ekm_import_fernet_key('BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ', 'key_x')$$) AS swapped;
SELECT try($$SELECT ekm_import_fernet_key('key_x', 'BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=', created_at => 'infinity')$$) AS infinite_date;
SELECT try($$SELECT * FROM ekm_import_fernet_keys('[{"key_id": "key_x", "key": "BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=", "created_at": "0000-01-01"}]')$$) AS year_zero;
SELECT try($$SELECT ekm_decrypt('FERNET_V2:a''b:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==')$$) AS id_with_a_quote;
SELECT count(*) AS key_x_imported FROM ekm.keys WHERE key_id = 'key_x';

-- Importing is for ekm_admin; an application role reads.
CREATE ROLE fernet_app;
GRANT ekm_user TO fernet_app;
SET ROLE fernet_app;
SELECT try($$SELECT ekm_import_fernet_key('key_x', 'BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=')$$) AS application_role_imports;
SELECT try($$SELECT * FROM ekm_import_fernet_keys('[]')$$) AS application_role_imports_many;
SELECT ekm_decrypt('FERNET_V2:key_20250927_abc123:gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==') AS application_role_reads;
RESET ROLE;
DROP ROLE fernet_app;
RESET client_min_messages;
