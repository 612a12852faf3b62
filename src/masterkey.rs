//! Obtaining the master key from outside the database. The key is read
//! only when data keys must be (un)wrapped and dropped (zeroized) right
//! after; it never reaches SQL, tables, errors or the log.

use crate::gucs::{self, MasterKeySource};
use ekm_core::{EkmError, MasterKey, Result};
use pgrx::pg_sys;
use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The development default's file name in the data directory.
pub const DEV_KEY_FILE: &str = "ekm_dev_master.key";

fn dev_key_path() -> PathBuf {
    let dir = unsafe { pg_sys::DataDir };
    if dir.is_null() {
        return PathBuf::from(DEV_KEY_FILE);
    }
    PathBuf::from(
        unsafe { CStr::from_ptr(dir) }
            .to_string_lossy()
            .into_owned(),
    )
    .join(DEV_KEY_FILE)
}

/// A short, non-secret description of the configured source.
pub fn describe(source: &MasterKeySource) -> String {
    match source {
        MasterKeySource::Command(_) => "ekm.master_key_command".into(),
        MasterKeySource::File(f) => format!("ekm.master_key_file ({f})"),
        MasterKeySource::DevDefault => {
            format!("development default ({})", dev_key_path().display())
        }
    }
}

/// At server start (postmaster): with no source configured, create the
/// development key file once (never overwriting one) and say so at WARNING.
pub fn startup() {
    if gucs::master_key_source() != MasterKeySource::DevDefault {
        return;
    }
    let path = dev_key_path();
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut f) => {
            let written = MasterKey::generate().and_then(|k| {
                let mut line = k.to_hex();
                line.push('\n');
                f.write_all(line.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| EkmError::MasterKeyUnavailable(format!("cannot write {}: {e}", path.display())))
            });
            match written {
                Ok(()) => pgrx::warning!(
                    "ekm: created a DEVELOPMENT DEFAULT master key in {}; it is not for production: it sits beside the data it protects and is copied by base backups. Set ekm.master_key_command or ekm.master_key_file",
                    path.display()
                ),
                Err(e) => pgrx::warning!("ekm: {e}"),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => pgrx::warning!(
            "ekm: using the DEVELOPMENT DEFAULT master key in {}; not for production: set ekm.master_key_command or ekm.master_key_file",
            path.display()
        ),
        Err(e) => pgrx::warning!("ekm: cannot create the development master key file {}: {e}", path.display()),
    }
}

fn read_key_file(path: &std::path::Path, what: &str) -> Result<MasterKey> {
    let f = std::fs::File::open(path).map_err(|e| {
        EkmError::MasterKeyUnavailable(format!("{what}: cannot open {}: {e}", path.display()))
    })?;
    if let Ok(m) = f.metadata() {
        if m.permissions().mode() & 0o077 != 0 {
            pgrx::warning!(
                "ekm: {} is readable by other users than the server's; chmod 600 it",
                path.display()
            );
        }
    }
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(128));
    f.take(4096).read_to_end(&mut buf).map_err(|e| {
        EkmError::MasterKeyUnavailable(format!("{what}: cannot read {}: {e}", path.display()))
    })?;
    MasterKey::parse(&buf, what)
}

/// Reads the master key from the configured source.
pub fn load() -> Result<MasterKey> {
    match gucs::master_key_source() {
        MasterKeySource::Command(cmd) => {
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(&cmd)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| {
                    EkmError::MasterKeyUnavailable(format!(
                        "ekm.master_key_command could not be started: {e}"
                    ))
                })?;
            let stdout = zeroize::Zeroizing::new(out.stdout);
            if !out.status.success() {
                return Err(EkmError::MasterKeyUnavailable(format!(
                    "ekm.master_key_command failed ({})",
                    out.status
                )));
            }
            MasterKey::parse(&stdout, "ekm.master_key_command")
        }
        MasterKeySource::File(f) => read_key_file(std::path::Path::new(&f), "ekm.master_key_file"),
        MasterKeySource::DevDefault => {
            let p = dev_key_path();
            if !p.exists() {
                return Err(EkmError::MasterKeyUnavailable(format!(
                    "neither ekm.master_key_command nor ekm.master_key_file is set, and the development key file {} is missing (it is created at server start)",
                    p.display()
                )));
            }
            read_key_file(&p, "the development default key file")
        }
    }
}
