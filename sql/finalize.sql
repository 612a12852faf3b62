-- The per-row functions, written against the V1 call convention (src/fastpath.rs).
CREATE FUNCTION @extschema@.ekm_encrypt(plaintext text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_encrypt_v1' LANGUAGE c VOLATILE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.ekm_encrypt(plaintext text, context text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_encrypt_v1' LANGUAGE c VOLATILE CALLED ON NULL INPUT PARALLEL SAFE;
CREATE FUNCTION @extschema@.ekm_decrypt(ciphertext text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_decrypt_v1' LANGUAGE c STABLE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.ekm_decrypt(ciphertext text, context text) RETURNS text
    AS 'MODULE_PATHNAME', 'ekm_decrypt_v1' LANGUAGE c STABLE CALLED ON NULL INPUT PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.ekm_encrypt(text) IS 'Encrypts under the active ekm key (AES-256-GCM).';
COMMENT ON FUNCTION @extschema@.ekm_encrypt(text, text) IS 'Encrypts under the active ekm key, bound to a context (associated data).';
COMMENT ON FUNCTION @extschema@.ekm_decrypt(text) IS 'Decrypts an ekm ciphertext with the key it names.';
COMMENT ON FUNCTION @extschema@.ekm_decrypt(text, text) IS 'Decrypts an ekm ciphertext that was bound to a context.';

-- Key table guards: lifecycle transitions and audit, cache invalidation,
-- and exactly one active key at every commit.
CREATE TRIGGER key_restore BEFORE INSERT ON ekm.key
    FOR EACH ROW WHEN (NEW.rotation_status = 'active') EXECUTE FUNCTION ekm._ekm_key_restore();
CREATE TRIGGER key_transition AFTER UPDATE ON ekm.key
    FOR EACH ROW EXECUTE FUNCTION ekm._ekm_key_transition();
CREATE TRIGGER key_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ekm.key
    FOR EACH STATEMENT EXECUTE FUNCTION ekm._ekm_key_changed();

-- SECURITY DEFINER: a deferred trigger runs as whoever commits (e.g. ekm_admin).
CREATE FUNCTION ekm._ekm_check_one_active() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF (SELECT count(*) FROM ekm.key WHERE rotation_status = 'active') <> 1
       AND EXISTS (SELECT 1 FROM ekm.key) THEN
        RAISE EXCEPTION 'ekm needs exactly one active key'
            USING ERRCODE = '23514',
                  HINT = 'activate a key with SELECT ekm_activate_key(key_id)';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER key_exactly_one_active AFTER INSERT OR UPDATE OR DELETE ON ekm.key
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ekm._ekm_check_one_active();

-- Key metadata for psql and monitoring: never the material.
CREATE VIEW ekm.keys AS
SELECT k.key_id, k.rotation_status, k.is_active,
       k.created_at, k.activated_at, k.rotated_at, k.retired_at, k.destroyed_at,
       p.expires_at, p.age_days, p.expires_in_days, p.needs_rotation, p.rotation_due_at,
       p.encryptions
FROM ekm.key k
CROSS JOIN LATERAL ekm._ekm_key_policy(k.key_id, k.created_at, k.encryptions) p
ORDER BY k.created_at, k.key_id;
COMMENT ON VIEW ekm.keys IS 'ekm keys: state, dates, policy (needs_rotation) and encryption counts.';

-- Privileges: nothing to PUBLIC. ekm_user encrypts and decrypts;
-- ekm_admin manages keys and reads metadata and the audit log.
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN
        SELECT d.objid::regprocedure FROM pg_catalog.pg_depend d
        WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass
          AND d.refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'ekm')
          AND d.classid = 'pg_catalog.pg_proc'::regclass AND d.deptype = 'e'
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION
    @extschema@.ekm_encrypt(text), @extschema@.ekm_encrypt(text, text),
    @extschema@.ekm_decrypt(text), @extschema@.ekm_decrypt(text, text),
    @extschema@.ekm_reencrypt(text, text), @extschema@.ekm_key_id(text),
    @extschema@.ekm_is_encrypted(text)
    TO ekm_user;
GRANT ekm_user TO ekm_admin;
GRANT EXECUTE ON FUNCTION
    @extschema@.ekm_create_key(), @extschema@.ekm_activate_key(text), @extschema@.ekm_key_status(),
    ekm._ekm_key_policy(text, timestamptz, bigint)
    TO ekm_admin;
GRANT USAGE ON SCHEMA ekm TO ekm_admin;
GRANT SELECT ON ekm.keys, ekm.audit_log TO ekm_admin;

-- The first key.
SELECT ekm._ekm_bootstrap_key();
