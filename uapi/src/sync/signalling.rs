//! DOC: signalling sections: the lockdep-style annotation every wait on shared memory
//! checks (Linux's `dma_fence_begin_signalling`).

std::thread_local! {
    /// The signalling section this thread is in, if any (see [`begin_signalling`]).
    static SIGNALLING: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// A thread's stay in a *signalling section*: code that something else's completion may
/// depend on (kmd-shim's fault service and eviction). Like Linux's
/// `dma_fence_begin_signalling`, it is a lockdep-style annotation: while it lives, a wait
/// on shared memory (a fence word, or any word another process signals) from this thread
/// panics in debug builds and tests, because a fence's signaller may itself be waiting for
/// this section to finish. Sections nest; ending one restores the outer one.
#[must_use = "the section ends when the guard is dropped"]
pub struct SignallingSection {
    outer: Option<&'static str>,
    /// Thread-bound: the annotation is per thread.
    _not_send: core::marker::PhantomData<*const ()>,
}

/// Enters a signalling section named `what` (for the panic message).
pub fn begin_signalling(what: &'static str) -> SignallingSection {
    SignallingSection {
        outer: SIGNALLING.with(|s| s.replace(Some(what))),
        _not_send: core::marker::PhantomData,
    }
}

impl Drop for SignallingSection {
    fn drop(&mut self) {
        SIGNALLING.with(|s| s.set(self.outer));
    }
}

/// The signalling section this thread is in, if any.
pub fn in_signalling_section() -> Option<&'static str> {
    SIGNALLING.with(|s| s.get())
}

/// Every wait on shared memory starts here: inside a signalling section it is a bug (a
/// possible deadlock), caught in debug builds and tests.
#[track_caller]
pub(super) fn assert_may_wait() {
    if cfg!(debug_assertions) {
        if let Some(what) = in_signalling_section() {
            panic!("wait on shared memory inside the signalling section `{what}`: a fence's signaller may be waiting for this section (dma_fence_begin_signalling rule)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::futex_wait;
    use core::sync::atomic::AtomicU32;
    use std::time::Duration;

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "inside the signalling section `fault service`")]
    fn a_wait_inside_a_signalling_section_panics() {
        let word = AtomicU32::new(0);
        let _s = begin_signalling("fault service");
        // The word never changes: without the annotation this would sleep 1 ms and return.
        futex_wait(&word, 0, Some(Duration::from_millis(1)));
    }

    #[test]
    fn signalling_sections_nest_and_end() {
        let word = AtomicU32::new(0);
        assert_eq!(in_signalling_section(), None);
        {
            let _a = begin_signalling("eviction");
            {
                let _b = begin_signalling("fault service");
                assert_eq!(in_signalling_section(), Some("fault service"));
            }
            assert_eq!(in_signalling_section(), Some("eviction"));
        }
        assert_eq!(in_signalling_section(), None);
        // Outside every section a wait is allowed (and returns: the word differs).
        futex_wait(&word, 1, Some(Duration::from_millis(1)));
    }
}
