//! Obtaining the master key from outside the database. The key is read
//! only when data keys must be (un)wrapped and dropped (zeroized) right
//! after; it never reaches SQL, tables, errors or the log.

use crate::pg::gucs::{self, MasterKeySource};
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

/// The command's output, read until it exits, at most
/// `ekm.master_key_command_timeout`; a statement cancel (or server shutdown)
/// stops the wait. The command runs in a process group of its own, which is
/// killed if ekm stops waiting for it (timeout, cancel, too much output), so
/// nothing it started is left behind.
fn run_command(cmd: &str, what: &str) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let unavailable = |why: String| EkmError::MasterKeyUnavailable(format!("{what} {why}"));
    let timeout = gucs::master_key_command_timeout();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| unavailable(format!("could not be started: {e}")))?;
    let mut stdout = child.stdout.take().expect("piped");
    /// Kills the command's process group and reaps it, unless it was reaped.
    struct Running(Option<std::process::Child>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                // SAFETY: kill(2) of the command's own process group.
                unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
                let _ = c.wait();
            }
        }
    }
    let mut running = Running(Some(child));
    let deadline = std::time::Instant::now() + timeout;
    let timed_out = || {
        unavailable(format!(
            "did not finish within ekm.master_key_command_timeout ({} s) and was stopped",
            timeout.as_secs()
        ))
    };
    // Waits until `fd` is readable (without one: at most 10 ms) while
    // serving interrupts; false once the deadline has passed.
    let wait = |fd: Option<i32>| -> bool {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = left.as_millis().min(if fd.is_some() { 1000 } else { 10 }) as std::ffi::c_long;
        let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
        if fd.is_some() {
            events |= pg_sys::WL_SOCKET_READABLE;
        }
        unsafe {
            let rc = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                fd.unwrap_or(-1),
                ms,
                pg_sys::PG_WAIT_EXTENSION,
            );
            if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
        }
        // a cancel or termination raises here; `running` kills the command
        pgrx::check_for_interrupts!();
        true
    };
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(128));
    let mut buf = zeroize::Zeroizing::new([0u8; 256]);
    let fd = stdout.as_raw_fd();
    loop {
        if !wait(Some(fd)) {
            return Err(timed_out());
        }
        // Non-blocking in effect: read only once poll says the pipe has data
        // or is at its end; a timeout of the wait itself just loops.
        if !readable(fd) {
            continue;
        }
        match stdout.read(&mut buf[..]) {
            Ok(0) => break,
            Ok(n) if out.len() + n > 4096 => {
                return Err(unavailable("printed more than 4096 bytes".into()));
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unavailable(format!("output could not be read: {e}"))),
        }
    }
    loop {
        let c = running.0.as_mut().expect("not yet reaped");
        match c.try_wait() {
            Ok(Some(status)) => {
                running.0 = None;
                if !status.success() {
                    return Err(unavailable(format!("failed ({status})")));
                }
                return Ok(out);
            }
            Ok(None) => {
                if !wait(None) {
                    return Err(timed_out());
                }
            }
            Err(e) => return Err(unavailable(format!("could not be waited for: {e}"))),
        }
    }
}

/// Whether `fd` has data or is at its end (poll(2) with no wait).
fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// Reads the master key from the configured source.
pub fn load() -> Result<MasterKey> {
    load_from(gucs::master_key_source(), false)
}

/// Reads the previous master key, while one is configured (a master key
/// rotation under way).
pub fn load_previous() -> Option<Result<MasterKey>> {
    gucs::previous_master_key_source().map(|s| load_from(s, true))
}

fn load_from(source: MasterKeySource, previous: bool) -> Result<MasterKey> {
    let (cmd_name, file_name) = if previous {
        (
            "ekm.previous_master_key_command",
            "ekm.previous_master_key_file",
        )
    } else {
        ("ekm.master_key_command", "ekm.master_key_file")
    };
    match source {
        MasterKeySource::Command(cmd) => MasterKey::parse(&run_command(&cmd, cmd_name)?, cmd_name),
        MasterKeySource::File(f) => read_key_file(std::path::Path::new(&f), file_name),
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
