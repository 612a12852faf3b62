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

/// The master key settings' names (`ekm.master_key_command`,
/// `ekm.previous_master_key_file`, ...): a statement naming one may carry
/// its value (a command with a token). And the function a Citus
/// coordinator sends its key catalog with (`ekm._ekm_cluster_apply`): its
/// statement carries wrapped keys.
const SETTINGS: [&[u8]; 3] = [
    b"master_key_command",
    b"master_key_file",
    b"_ekm_cluster_apply",
];

/// Whether `hay` contains `needle` (ASCII, any case), without allocating:
/// it runs on every log line, over statements of any size.
fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || hay
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Whether a statement's text names one of them (any case).
pub fn mentions_plaintext_functions(query: &[u8]) -> bool {
    NAMES.iter().any(|n| contains_ignore_case(query, n))
}

/// Whether a statement's text names a master key setting or carries wrapped
/// keys between Citus nodes (any case): never logged.
pub fn mentions_master_key_settings(query: &[u8]) -> bool {
    SETTINGS.iter().any(|n| contains_ignore_case(query, n))
}

/// Whether a message quotes the statement a Citus coordinator sends its
/// key catalog with (`citus.log_remote_commands` logs "issuing ..." with
/// it): wrapped keys, never logged.
pub fn quotes_key_catalog(message: &[u8]) -> bool {
    contains_ignore_case(message, b"_ekm_cluster_apply(")
}

/// A log DETAIL that quotes other sessions' statements (a deadlock report:
/// `Process 123: UPDATE ...`, one per line), with each line that names an
/// ekm plaintext function or a master key setting cut after its `: ` and
/// replaced by the marker. None if no line does.
pub fn redact_quoted_statements(detail: &str) -> Option<String> {
    // most DETAILs name nothing of ekm's: answer without building lines
    let d = detail.as_bytes();
    if !mentions_plaintext_functions(d) && !mentions_master_key_settings(d) {
        return None;
    }
    let mut changed = false;
    let lines: Vec<String> = detail
        .split('\n')
        .map(|l| {
            if mentions_plaintext_functions(l.as_bytes())
                || mentions_master_key_settings(l.as_bytes())
            {
                changed = true;
                match l.split_once(": ") {
                    Some((head, _)) => format!("{head}: {MARKER}"),
                    None => MARKER.to_string(),
                }
            } else {
                l.to_string()
            }
        })
        .collect();
    changed.then(|| lines.join("\n"))
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
    fn finds_the_key_catalog_in_messages() {
        assert!(quotes_key_catalog(
            b"issuing SELECT ekm._ekm_cluster_apply('[...]'::jsonb)"
        ));
        assert!(!quotes_key_catalog(
            b"Set ekm.master_key_command or ekm.master_key_file"
        ));
    }

    #[test]
    fn finds_the_master_key_settings_in_any_case() {
        assert!(mentions_master_key_settings(
            b"SELECT ekm._ekm_cluster_apply('[{\"wrapped\": \"c71e\"}]'::jsonb)"
        ));
        assert!(mentions_master_key_settings(
            b"ALTER SYSTEM SET ekm.master_key_command = 'vault read token=s3cr3t'"
        ));
        assert!(mentions_master_key_settings(
            b"set EKM.Previous_Master_Key_File to '/k'"
        ));
        assert!(!mentions_master_key_settings(
            b"ALTER SYSTEM SET ekm.key_lifetime_days = 30"
        ));
    }

    #[test]
    fn a_deadlock_report_loses_only_the_lines_that_name_ekm() {
        let d = "Process 10 waits for ShareLock on transaction 5; blocked by process 11.\n\
                 Process 11 waits for ShareLock on transaction 6; blocked by process 10.\n\
                 Process 10: UPDATE dla SET v = 'x' WHERE id = 2\n\
                 Process 11: UPDATE dla SET v=ekm_encrypt('PLAIN-DL-42') WHERE id = 1";
        let r = redact_quoted_statements(d).expect("redacted");
        assert!(!r.contains("PLAIN-DL-42"), "{r}");
        assert!(r.contains("Process 11: (redacted by ekm)"), "{r}");
        assert!(
            r.contains("Process 10: UPDATE dla SET v = 'x' WHERE id = 2"),
            "{r}"
        );
        assert!(r.contains("blocked by process 11."), "{r}");
        assert_eq!(redact_quoted_statements("Process 1: SELECT 1"), None);
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
