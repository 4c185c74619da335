#![no_main]
//! Fuzzes `flr_fuzz_checks::manifest::check` (what it checks is documented there).

#[global_allocator]
static ALLOC: flr_fuzz_checks::alloc::CountingAlloc = flr_fuzz_checks::alloc::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| flr_fuzz_checks::manifest::check(data));
