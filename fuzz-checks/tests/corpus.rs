//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) and the
//! inputs that once crashed (`fuzz/regressions/<target>/`) through its
//! target's checks, with allocations counted as in the fuzzer, so CI
//! catches a regression on any input the fuzzer once found interesting.

use std::path::PathBuf;

use flr_fuzz_checks::alloc::{self, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn replay(target: &str) {
    assert!(alloc::counting(), "the counting allocator is not installed");
    let check = flr_fuzz_checks::target(target).expect("a known target");
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let dir = fuzz.join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    // Inputs that once crashed, kept whether or not a merge keeps them.
    if let Ok(found) = std::fs::read_dir(fuzz.join("regressions").join(target)) {
        files.extend(found.map(|e| e.expect("a directory entry").path()));
    }
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("a corpus file");
        // A panic names the file, to rerun it alone under the fuzzer.
        eprintln!("{target}: {}", file.display());
        check(&data);
    }
    let (peak, bound) = alloc::take_worst();
    println!(
        "{target}: {} inputs; closest to its allocation bound: {peak} of {bound} bytes",
        files.len()
    );
}

#[test]
fn envelope_corpus() {
    replay("envelope");
}

#[test]
fn pack_corpus() {
    replay("pack");
}

#[test]
fn index_corpus() {
    replay("index");
}

#[test]
fn manifest_corpus() {
    replay("manifest");
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn daemon_json_corpus() {
    replay("daemon_json");
}

#[test]
fn every_target_is_replayed() {
    let names: Vec<&str> = flr_fuzz_checks::TARGETS.iter().map(|t| t.0).collect();
    let this = include_str!("corpus.rs");
    for name in names {
        assert!(
            this.contains(&format!("replay(\"{name}\")")),
            "{name} has no replay test"
        );
    }
}

#[test]
fn checkpoint_corpus() {
    replay("checkpoint");
}

#[test]
fn journal_corpus() {
    replay("journal");
}

#[test]
fn the_bound_catches_a_decoder_that_trusts_a_length_field() {
    // What a decoder does that reserves what a garbled length field says:
    // 16 MiB for 16 bytes of input.
    let (reserved, peak) = alloc::measure(|| Vec::<u8>::with_capacity(16 << 20));
    drop(reserved);
    assert!(peak >= 16 << 20);
    let caught = std::panic::catch_unwind(|| {
        alloc::assert_within(
            "test",
            peak,
            16,
            flr_fuzz_checks::meta::PER_BYTE,
            flr_fuzz_checks::meta::FIXED,
        )
    });
    assert!(caught.is_err());
    alloc::take_worst();
}
