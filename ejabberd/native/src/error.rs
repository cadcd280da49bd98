//! Engine errors as Erlang terms: `{error, <<"reason">>}`.

use rustler::{Encoder, Env, Term};

/// What can go wrong in a call from Erlang.
#[derive(Debug, thiserror::Error)]
pub enum NifError {
    /// The engine refused the input.
    #[error("dmuc: {0}")]
    Engine(#[from] dmuc::Error),
    /// An option has the wrong shape.
    #[error("dmuc: option '{option}': {reason}")]
    Option {
        /// The option.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

rustler::atoms! { error }

impl Encoder for NifError {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        (error(), self.to_string()).encode(env)
    }
}
