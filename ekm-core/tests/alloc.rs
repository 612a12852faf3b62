//! Allocation discipline of the code that runs inside a PostgreSQL backend,
//! shown with a global allocator that counts allocations and, while a test
//! asks it to, refuses large ones (as a machine out of memory would). A
//! failed infallible Rust allocation aborts the process, and in a backend
//! that sends the whole server into crash recovery: sizes that come from
//! input must be allocated fallibly (an `OutOfMemory` error, 53200).

use ekm_core::redact::{mentions_master_key_settings, mentions_plaintext_functions};
use ekm_core::EkmError;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

struct Limited;
thread_local! {
    /// Allocations made by this thread (the test harness's other threads
    /// allocate too: counting them all made the count flaky).
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
fn allocations() -> usize {
    ALLOCATIONS.with(|a| a.get())
}
/// While set, allocations above `LIMIT` fail.
static REFUSE_LARGE: AtomicBool = AtomicBool::new(false);
const LIMIT: usize = 16 << 20;
/// The tests share the allocator's switches: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        if REFUSE_LARGE.load(Ordering::SeqCst) && l.size() > LIMIT {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Limited = Limited;

/// Runs `f` with large allocations refused.
fn refusing_large<R>(f: impl FnOnce() -> R) -> R {
    REFUSE_LARGE.store(true, Ordering::SeqCst);
    let r = f();
    REFUSE_LARGE.store(false, Ordering::SeqCst);
    r
}

/// The log hook's statement search runs for every log line, over
/// statements of any size: it allocates nothing (it used to lowercase a
/// copy of the whole statement).
#[test]
fn statement_search_does_not_allocate() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut q = vec![b'a'; 8 << 20];
    let tail = b"SELECT EKM_DECRYPT(v)";
    let n = q.len();
    q[n - tail.len()..].copy_from_slice(tail);
    let before = allocations();
    let found = mentions_plaintext_functions(&q);
    let setting = mentions_master_key_settings(&q);
    let after = allocations();
    assert!(found);
    assert!(!setting);
    assert_eq!(after - before, 0, "the search allocated");
}

/// `ekm_fernet_token_time` on a huge token: an error, not an abort (its
/// decode buffer was `vec![0; n]`).
#[test]
fn a_huge_fernet_token_is_an_error() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let token = vec![b'A'; 64 << 20];
    let r = refusing_large(|| ekm_core::fernet::token_time(&token));
    assert!(matches!(r, Err(EkmError::OutOfMemory(_))), "{r:?}");
}

/// `ekm_reencrypt` of a value already on the active key returns a copy of
/// it: made fallibly (it was `to_string()`).
#[test]
fn a_huge_copy_is_an_error() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = "x".repeat(64 << 20);
    let r = refusing_large(|| ekm_core::crypto::try_copy_str(&s));
    assert!(matches!(r, Err(EkmError::OutOfMemory(_))), "{r:?}");
    assert_eq!(ekm_core::crypto::try_copy_str("abc").unwrap(), "abc");
}
