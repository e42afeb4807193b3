//! Containment of a panic inside one reconcile: a bug triggered by one object must not
//! take down the process and, with it, every other object's reconciles (kube-runtime's
//! `Controller` polls reconcilers inline, so an uncaught panic ends the whole controller).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

/// Run `fut`; a panic in it comes back as `Err(message)`.
///
/// `AssertUnwindSafe`: what a reconcile shares (the context's caches and mutexes) stays
/// usable after a panic (mutexes are taken with `PoisonError::into_inner` where one may be
/// held across a panic), and everything else a reconcile touched is dropped with it.
pub async fn catch_panic<F: Future>(fut: F) -> Result<F::Output, String> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|payload| panic_message(payload.as_ref()))
}

/// The message a panic was raised with.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        let out = futures::executor::block_on(catch_panic(async {
            let v: Vec<u8> = Vec::new();
            v[usize::from(v.is_empty()) + 1]
        }));
        assert!(out.unwrap_err().contains("index out of bounds"));
        let out: Result<(), String> =
            futures::executor::block_on(catch_panic(async { std::panic::panic_any(7_u8) }));
        assert_eq!(out.unwrap_err(), "a panic without a message");
        assert_eq!(futures::executor::block_on(catch_panic(async { 3 })), Ok(3));
    }
}
