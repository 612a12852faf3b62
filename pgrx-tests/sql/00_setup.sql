-- Shared helper for the regression tests: runs a statement and shows its
-- SQLSTATE and message, with key ids masked (they are random).
CREATE EXTENSION ekm;
CREATE FUNCTION public.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}', 'key_X', 'g');
END
$$;
-- Same, with the hint.
CREATE FUNCTION public.try_hint(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE h text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS h = PG_EXCEPTION_HINT;
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM || ' | HINT: ' || coalesce(h, ''), 'key_[0-9]{8}_[0-9]{6}_[0-9a-f]{4}', 'key_X', 'g');
END
$$;
GRANT EXECUTE ON FUNCTION public.try(text), public.try_hint(text) TO PUBLIC;
