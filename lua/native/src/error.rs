//! Engine errors as Lua errors. A Lua error is caught by the shim's `pcall`, logged through
//! `module:log`, and the stanza is answered with an XMPP error: it never crashes Prosody.

use thiserror::Error;

/// What can go wrong in a call from Lua.
#[derive(Debug, Error)]
pub enum ShimError {
    /// The engine refused the input.
    #[error("dmuc: {0}")]
    Engine(#[from] dmuc::Error),
    /// A configuration value has the wrong shape.
    #[error("dmuc: option '{option}': {reason}")]
    Option {
        /// The option's name.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<ShimError> for mlua::Error {
    fn from(e: ShimError) -> Self {
        mlua::Error::external(e)
    }
}
