//! The typed errors the engine returns for input it cannot use.
//!
//! None of these is fatal to the engine: the host logs the error and, where the input was a stanza
//! that expects an answer, the engine has already queued an XMPP error for it.

use thiserror::Error;

/// Why a stanza or element handed to the engine was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The bytes are not one well-formed XML element.
    #[error("malformed XML: {0}")]
    Xml(String),
    /// The element is not the one this function accepts.
    #[error("expected <{expected}/>, got <{got}/>")]
    UnexpectedElement {
        /// What the caller should have passed.
        expected: &'static str,
        /// What it passed.
        got: String,
    },
    /// A required attribute is missing.
    #[error("<{element}/> lacks the '{attribute}' attribute")]
    MissingAttribute {
        /// Element name.
        element: &'static str,
        /// Attribute name.
        attribute: &'static str,
    },
    /// An attribute holds a value that does not parse.
    #[error("invalid '{attribute}' on <{element}/>: {reason}")]
    InvalidAttribute {
        /// Element name.
        element: &'static str,
        /// Attribute name.
        attribute: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A child element does not parse.
    #[error("invalid <{element}/>: {reason}")]
    InvalidElement {
        /// Element name.
        element: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A JID does not parse.
    #[error("invalid JID '{jid}': {reason}")]
    InvalidJid {
        /// The text that failed.
        jid: String,
        /// What the jid crate said.
        reason: String,
    },
    /// The stanza nests deeper than the configured limit (see [`crate::bounds`]). Refused
    /// before any tree is built.
    #[error("stanza nests deeper than {limit} levels")]
    TooDeep {
        /// The limit in force.
        limit: usize,
    },
    /// The stanza's text is longer than the configured limit (see [`crate::bounds`]).
    #[error("stanza of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The stanza's size in bytes.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// Configuration handed to the engine at start is unusable.
    #[error("bad configuration: {0}")]
    Config(String),
}

impl Error {
    /// Is this a refusal under the depth or size limits? Hosts answer those with
    /// `policy-violation` rather than `bad-request`.
    pub fn is_limit(&self) -> bool {
        matches!(self, Error::TooDeep { .. } | Error::TooLarge { .. })
    }

    pub(crate) fn invalid(element: &'static str, reason: impl ToString) -> Self {
        Error::InvalidElement {
            element,
            reason: reason.to_string(),
        }
    }
}

impl From<xso::error::FromElementError> for Error {
    fn from(e: xso::error::FromElementError) -> Self {
        match e {
            xso::error::FromElementError::Mismatch(el) => Error::UnexpectedElement {
                expected: "known element",
                got: el.name().to_string(),
            },
            xso::error::FromElementError::Invalid(e) => Error::InvalidElement {
                element: "element",
                reason: e.to_string(),
            },
        }
    }
}
