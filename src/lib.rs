//! # dmuc: Distributed Multi-User Chat, as a sans-IO engine
//!
//! A chat room lives on one server, the *master*. Users on a distant server reach it through a
//! *mirror* of the room on their own server, over a slow and unreliable s2s link. The master sends
//! each broadcast once per mirror instead of once per remote occupant; the mirror fans it out to
//! its local users, serves joins from its own copy of the room, and keeps local chat going while
//! the link is down. The protocol is DMUC3 (see `docs/protocol.md`).
//!
//! The engine does no I/O: no sockets, no clock, no global state. A host (a Prosody module, an
//! ejabberd module, a test) feeds it stanzas as XML text plus the current [`Timestamp`], and takes
//! out stanzas to route and the time it wants to be called back. Everything crossing the boundary
//! is a string or a small plain value, so a Lua or Erlang shim stays thin.
//!
//! - [`master::Master`]: beside the host's MUC service. The host's rooms stay the authority.
//! - [`mirror::Mirror`]: the mirror service on the users' server.
//!
//! # The host's run loop
//!
//! ```
//! use dmuc::mirror::{Mirror, MirrorConfig, Verdict};
//! use dmuc::Timestamp;
//!
//! let mut mirror = Mirror::new(MirrorConfig::new(
//!     "mirror.raleigh.localhost",
//!     vec!["conference.fairfax.localhost".into()],
//! ));
//! let now = Timestamp(1_700_000_000_000);
//! // A local user's stanza for a mirrored room:
//! let join = "<presence from='wayne@raleigh.localhost/pc' \
//!             to='chatroom@conference.fairfax.localhost/Wayne'>\
//!             <x xmlns='http://jabber.org/protocol/muc'/></presence>";
//! assert_eq!(mirror.handle_local(now, join).unwrap(), Verdict::Consumed);
//! // Route everything the engine wants sent...
//! while let Some(xml) = mirror.poll_transmit() {
//!     assert!(xml.contains("<dmuc xmlns='http://tridsys.com/protocol/dmuc'"));
//! }
//! // ...and call back at the time it asks for.
//! if let Some(at) = mirror.poll_timeout() {
//!     mirror.handle_timeout(at);
//! }
//! ```
//!
//! A master host does the same with [`master::Master`]: it calls `handle_presence` on every
//! presence to an occupant JID before its MUC does, brackets each room broadcast with
//! `begin_broadcast`/`end_broadcast`, passes every stanza its MUC sends to an occupant behind a
//! mirror through `handle_outbound`, and drains `poll_transmit` and `poll_action` after each call.

pub mod ack;
pub mod bounds;
pub mod elements;
pub mod error;
pub mod escape;
#[cfg(feature = "host-log")]
pub mod host_log;
pub mod link;
pub mod link_watch;
pub mod master;
pub mod mirror;
pub mod mirror_quota;
pub mod ns;
pub mod queue;
pub mod rate;
pub mod recent;
pub mod room_history;
pub mod room_rules;
pub mod stanza;
pub mod stanza_ids;
pub mod time;
pub mod transmit;

pub use error::Error;
pub use time::Timestamp;
