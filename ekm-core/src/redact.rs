//! Pure parts of ekm's log redaction (the extension's src/redact.rs decides
//! when to redact): which statements name ekm's plaintext functions, and a
//! message with its quoted parts replaced.

/// What replaces redacted text.
pub const MARKER: &str = "(redacted by ekm)";

/// The functions that take or return plaintext, and those that take key
/// material (the Fernet key imports).
const NAMES: [&[u8]; 4] = [
    b"ekm_encrypt",
    b"ekm_decrypt",
    b"ekm_reencrypt",
    b"ekm_import_fernet_key",
];

/// Whether a statement's text names one of them (any case).
pub fn mentions_plaintext_functions(query: &[u8]) -> bool {
    let q = query.to_ascii_lowercase();
    NAMES.iter().any(|n| q.windows(n.len()).any(|w| w == *n))
}

/// `msg` with every `"..."` part replaced by the marker (data exceptions
/// quote the value they could not take).
pub fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut parts = msg.split('"');
    out.push_str(parts.next().unwrap_or(""));
    let mut inside = true;
    for p in parts {
        out.push('"');
        out.push_str(if inside { MARKER } else { p });
        inside = !inside;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_plaintext_functions_in_any_case() {
        assert!(mentions_plaintext_functions(b"SELECT ekm_encrypt('x')"));
        assert!(mentions_plaintext_functions(
            b"select EKM_DECRYPT(v) from t"
        ));
        assert!(mentions_plaintext_functions(
            b"SELECT public.Ekm_ReEncrypt(v)"
        ));
        assert!(mentions_plaintext_functions(
            b"SELECT ekm_import_fernet_keys('[...]')"
        ));
        assert!(!mentions_plaintext_functions(b"SELECT ekm_key_id(v)"));
        assert!(!mentions_plaintext_functions(b"SELECT 'plain'::int"));
    }

    #[test]
    fn quoted_parts_go() {
        assert_eq!(
            redact_quoted("value \"4111111111111111\" is out of range for type integer"),
            "value \"(redacted by ekm)\" is out of range for type integer"
        );
        assert_eq!(
            redact_quoted("invalid input syntax for type integer: \"abc\""),
            "invalid input syntax for type integer: \"(redacted by ekm)\""
        );
        assert_eq!(redact_quoted("no quotes"), "no quotes");
        assert_eq!(
            redact_quoted("a \"b\" c \"d\" e"),
            "a \"(redacted by ekm)\" c \"(redacted by ekm)\" e"
        );
    }
}
