//! `dmuc_nif`: the rustler NIF that `dmuc_nif.erl` loads for `mod_dmuc`. It only exports; the
//! wrappers live in [`master`], [`mirror`] and [`watch`], errors in [`error`], logging in [`log`].
//!
//! Every call returns what the engine wants routed (`[Xml]`) along with its verdict, so the
//! Erlang side is a loop over results. Engine errors come back as `{error, Reason}`; a panic
//! becomes `error:nif_panicked` in the caller and the VM survives.

mod error;
mod log;
mod master;
mod mirror;
mod watch;

rustler::init!("dmuc_nif", load = log::load);

/// The engine behind a resource. A panic in an earlier call (rustler turned it into
/// `nif_panicked` for that caller) poisons the lock; the engine then goes on with the state that
/// call left, rather than every room and the mirror losing dmuc until the server restarts.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| {
        m.clear_poison();
        poisoned.into_inner()
    })
}
