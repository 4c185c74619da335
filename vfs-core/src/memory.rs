//! Giving freed memory back after a large, rare allocation.
//!
//! Loading a manifest or scanning the index allocates tens of MiB for a
//! moment. An allocator that keeps freed pages for reuse (as the `flr`
//! binary's does) would hold them for the life of a mount, so that a
//! mount's resident size would be its peak rather than what it keeps.
//! The binary registers how to hand such pages back, and the places that
//! free a large amount at once call [`release_freed`]. Nothing else pays
//! for it: the read path never calls it.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Sets what [`release_freed`] runs; the first call wins.
pub fn set_release_hook(hook: fn()) {
    let _ = RELEASE.set(hook);
}

/// Returns freed memory to the system, if the program said how.
pub fn release_freed() {
    if let Some(hook) = RELEASE.get() {
        hook();
    }
}
