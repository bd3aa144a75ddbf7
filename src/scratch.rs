//! Reused scratch buffers of the CPU ops. A multi-megabyte `Vec` allocated per call comes from
//! a fresh mapping: every first touch of a page is a fault and the kernel zeroes the page (18%
//! of a ResNet18 training step on the CPU before this pool). Ops take their per-thread buffers
//! here and give them back; what is kept is bounded by [`KEEP`] sets.

use std::any::Any;
use std::sync::Mutex;

/// Sets of buffers kept at most (a few per thread of a 2-to-16-core machine).
const KEEP: usize = 64;

static POOL: Mutex<Vec<Box<dyn Any + Send>>> = Mutex::new(Vec::new());

/// A kept `S` (its buffers still allocated, their contents stale), or a new one.
pub fn take<S: Default + Send + 'static>() -> S {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match pool.iter().rposition(|b| b.is::<S>()) {
        Some(i) => match pool.swap_remove(i).downcast::<S>() {
            Ok(s) => *s,
            Err(_) => S::default(),
        },
        None => S::default(),
    }
}

/// Keeps `s` for a later [`take`] (dropped when [`KEEP`] sets are kept already).
pub fn give<S: Send + 'static>(s: S) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < KEEP {
        pool.push(Box::new(s));
    }
}

/// `buf` resized to `len` without clearing what it held (for buffers about to be overwritten
/// in full).
pub fn ensure_len<T: Copy + Default>(buf: &mut Vec<T>, len: usize) {
    if buf.len() > len {
        buf.truncate(len);
    } else {
        buf.resize(len, T::default());
    }
}

/// `buf` resized to `len`, every element zero.
pub fn zeroed<T: Copy + Default>(buf: &mut Vec<T>, len: usize) {
    buf.clear();
    buf.resize(len, T::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_set_is_taken_again_with_its_allocation() {
        #[derive(Default)]
        struct Probe(Vec<u16>);
        let mut p: Probe = take();
        p.0.resize(1000, 7);
        let ptr = p.0.as_ptr();
        give(p);
        let again: Probe = take();
        assert_eq!(again.0.as_ptr(), ptr);
        let other: Probe = take();
        assert!(other.0.is_empty(), "a set is handed out once");
    }
}
