//! Gives the allocator's free memory back to the system after a burst of short-lived allocations.
//!
//! Start-up reads the config and every token file, and each read leaves small freed blocks between
//! the accounts' long-lived ones. glibc returns only the top of its heap by itself, so those holes
//! would stay resident for the daemon's whole life: 8 MiB at 100,000 accounts.

/// Returns whole free pages inside the heap to the system (glibc's `malloc_trim`); elsewhere a no-op.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread at any time; glibc
    // serializes it with malloc and free by the arenas' own locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}
