//! What each fuzz target checks, shared by the libFuzzer binaries in
//! `fuzz/fuzz_targets/` and the corpus replay test (`tests/corpus.rs`), so
//! `cargo test` runs every committed corpus file through the same checks
//! with no fuzzer installed.
//!
//! - [`alloc`]: a counting global allocator (installed by each binary) and
//!   [`alloc::measure`], the peak live bytes of one decode on this thread.
//! - [`meta`]: turns fuzz input into a metadata envelope (plain, compressed
//!   by the harness, a raw zstd frame, or a whole file; optionally sealed),
//!   so mutations get past the checksum to the decoders behind it.
//! - [`repos`]: the process's repositories over `MemoryStore`, plain and
//!   encrypted (with tiny key-derivation costs), made once.
//! - One module per target, each with a `check(&[u8])` that panics when a
//!   property fails: it feeds the bytes to the entry point the product uses
//!   on bytes read from disk or a socket, and asserts it neither panics nor
//!   allocates more than its bound. Hangs are the fuzzer's `-timeout`.
//! - [`seeds`]: starting inputs made by the product's own writers.

pub mod alloc;
pub mod config;
pub mod daemon;
pub mod envelope;
pub mod index;
pub mod manifest;
pub mod meta;
pub mod pack;
pub mod repos;
pub mod seeds;
pub mod session;

/// A target's check: panics when a property fails.
pub type Check = fn(&[u8]);

/// Every target by name (its corpus is `fuzz/corpus/<name>/`) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("envelope", envelope::check),
    ("pack", pack::check),
    ("index", index::check),
    ("manifest", manifest::check),
    ("config", config::check),
    ("daemon_json", daemon::check),
    ("checkpoint", session::check_checkpoint),
    ("journal", session::check_journal),
];

/// The check of the target called `name`.
pub fn target(name: &str) -> Option<Check> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
