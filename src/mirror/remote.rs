//! Stanzas from the master: broadcasts (presences, groupchat), the sync IQs, errors about local
//! users' stanzas, and stanzas to users' escaped addresses at the mirror.

use jid::Jid;
use minidom::Element;
use tracing::{debug, info, warn};

use super::classify::{final_leave, fingerprint, is_bounce, is_historic};
use super::outbound::Refusal;
use super::replica::{current_presence, Occupant};
use super::room::Sync;
use super::{split, Mirror, Verdict};

/// Live messages from the master held per room while a catch-up is due (the catch-up has the
/// oldest again, should they be dropped).
const HELD: usize = 1000;
use crate::elements::{Config, HistoryResult, Roster, Whois};
use crate::error::Error;
use crate::escape;
use crate::ns;
use crate::room_history::{self, Entry};
use crate::room_rules::RoomRules;
use crate::stanza::{self, Condition};
use crate::stanza_ids;
use crate::time::Timestamp;

impl Mirror {
    /// A stanza from a mirrored room straight to a local user: a join error from a master
    /// that does not route errors through the mirror ends the pending join; the s2s bounce of a
    /// message in flight means the link is down (the message is sent again later, so the user
    /// does not see the bounce).
    pub(super) fn observe(
        &mut self,
        now: Timestamp,
        el: &Element,
        from: &Jid,
        to: &Jid,
    ) -> Verdict {
        if el.name() == "message" && stanza::stanza_type(el) == Some("error") {
            let room = from.to_bare().to_string();
            let id = el.attr("id").unwrap_or_default();
            let ours = self
                .rooms
                .get(&room)
                .is_some_and(|r| r.out.is_ours(to.as_str(), id));
            if !ours {
                return Verdict::Pass;
            }
            let master = from.domain().as_str().to_ascii_lowercase();
            if is_bounce(el) {
                info!(%room, "a message bounced: the link is down");
                self.link_lost(now, &master);
                return Verdict::Consumed;
            }
            let not_occupant = el
                .get_child("error", ns::JABBER_CLIENT)
                .is_some_and(|e| e.has_child("not-acceptable", ns::XMPP_STANZAS));
            if not_occupant {
                // The master lost this user (and has not told us yet): rejoin them, and send
                // what was in flight again once it has them.
                info!(%room, user = %to, "the master says a local user is not in the room: rejoining");
                if let Some(r) = self.rooms.get_mut(&room) {
                    if r.out.refuse(to.as_str(), id) == Refusal::Delivered {
                        // Acknowledged, so deleted from storage: it is ours to deliver again.
                        if let Some(q) = r.out.refused.last() {
                            self.store.put(&r.replica.jid, q, None);
                        }
                    }
                }
                self.rejoin_user(&room, to.as_str());
                return Verdict::Consumed;
            }
            return Verdict::Pass;
        }
        if el.name() != "presence" || stanza::stanza_type(el) != Some("error") {
            return Verdict::Pass;
        }
        let (room, nick) = split(from);
        let user = to.to_string();
        if let Some(r) = self.rooms.get_mut(&room) {
            r.pending
                .retain(|n, p| !(p.user == user && nick.as_deref().is_none_or(|x| x == n)));
        }
        if let Some(nick) = nick {
            self.rejoin_refused(now, &room, &nick);
        }
        self.close_if_empty(&room);
        Verdict::Pass
    }

    /// A stanza to `user\40host\2fres@mirror`: deliver it to the user. The node may have been
    /// case-folded on the way, so the exact JID comes from the users the mirror knows.
    pub(super) fn escaped(
        &mut self,
        now: Timestamp,
        mut el: Element,
        to: &Jid,
    ) -> Result<Verdict, Error> {
        let guess = escape::jid_from_service_address(to).map_err(|e| Error::InvalidJid {
            jid: to.to_string(),
            reason: e.to_string(),
        })?;
        let known = self
            .rooms
            .values()
            .flat_map(|r| {
                r.pending
                    .values()
                    .map(|p| p.user.clone())
                    .chain(r.replica.local.keys().cloned())
            })
            .chain(self.recently_left.iter().cloned())
            .find(|u| escape::matches_address(to, u));
        let Some(user) = known else {
            // Only users with a join under way or in a room here: the mirror is no open relay.
            warn!(address = %to, user = %guess, "dropped a stanza for a user this mirror does not serve");
            return Ok(Verdict::Consumed);
        };
        let user = stanza::parse_jid(&user)?;
        let room_withdrawal = el.name() == "presence"
            && stanza::stanza_type(&el) == Some("unavailable")
            && el.attr("from").is_some_and(|f| !f.contains('/'));
        if room_withdrawal && self.withdrawn.remove(user.as_str()) {
            debug!(%user, "the room's withdrawal of its presence was shown already");
            return Ok(Verdict::Consumed);
        }
        if room_withdrawal {
            if self.room_withdrew.len() >= 1000 {
                self.room_withdrew.clear();
            }
            self.room_withdrew.insert(user.to_string());
        }
        stanza::set_attr(&mut el, "to", user.to_string());
        let from = el.attr("from").and_then(|f| Jid::new(f).ok());
        if let Some(from) = &from {
            // The room's occupant list for a join under way can hold what the replica has not:
            // affiliated users who are offline (Prosody's presence broadcast for role `none`).
            // It is served in its place, after the occupants, when the join is.
            let room = from.to_bare().to_string();
            if el.name() == "presence" && stanza::stanza_type(&el) == Some("error") {
                // A refused join echoes it as the master got it, without the `<history/>` the
                // user asked the mirror for: the user sees their own join echoed.
                let nick = from.resource().map(|n| n.to_string()).unwrap_or_default();
                if let Some(p) = self
                    .rooms
                    .get(&from.to_bare().to_string())
                    .and_then(|r| r.pending.get(&nick))
                    .filter(|p| p.user == user.as_str())
                {
                    restore_join_echo(&mut el, &p.join);
                }
            }
            self.direct_session(&room, &el, from, user.as_str());
            let listed = el.name() == "presence"
                && stanza::stanza_type(&el) == Some("unavailable")
                && from.resource().is_some();
            if let Some(r) = self.rooms.get_mut(&room).filter(|_| listed) {
                if r.pending
                    .values()
                    .any(|p| p.user == user.as_str() && !p.direct)
                {
                    r.listed.entry(user.to_string()).or_default().push(el);
                    return Ok(Verdict::Consumed);
                }
            }
            if self.observe(now, &el, from, &user) == Verdict::Consumed {
                // A refusal the mirror acts on itself (it rejoins the user and sends the message
                // again): the user must not see it.
                return Ok(Verdict::Consumed);
            }
        }
        self.send(&el);
        Ok(Verdict::Consumed)
    }

    /// The room's own copy of a nick's presence for one of its sessions here, where the nick
    /// has several (multi-session nicks): the session's own presence admits a direct session's
    /// join; its own leave ends its stay here.
    fn direct_session(&mut self, room: &str, el: &Element, from: &Jid, user: &str) {
        let Some(nick) = from.resource().map(|n| n.to_string()) else {
            return;
        };
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if el.name() != "presence" {
            return;
        }
        match stanza::stanza_type(el) {
            None => {
                let admit = r
                    .pending
                    .get(&nick)
                    .is_some_and(|p| p.direct && p.user == user);
                if admit && stanza::has_status(el, "110") {
                    if let Some(p) = r.pending.remove(&nick) {
                        debug!(%room, %nick, %user, "a second session on the nick, served by the master");
                        r.replica.local.insert(p.user.clone(), (nick, p.join));
                        r.direct.insert(p.user);
                    }
                }
            }
            Some("unavailable") => {
                let own = r.replica.local.get(user).is_some_and(|(n, _)| *n == nick);
                if !own || !r.shared(&nick) {
                    return;
                }
                r.replica.local.remove(user);
                r.direct.remove(user);
                if let Some(o) = r.replica.occupants.get_mut(&nick) {
                    if o.local.as_deref() == Some(user) {
                        o.local = r
                            .replica
                            .local
                            .iter()
                            .find(|(_, (n, _))| *n == nick)
                            .map(|(u, _)| u.clone());
                    }
                }
                self.recently_left.insert(user.to_string());
            }
            _ => {}
        }
    }

    pub(super) fn remote_presence(
        &mut self,
        now: Timestamp,
        mut el: Element,
        room: &str,
        nick: &str,
    ) {
        stanza::remove_attr(&mut el, "to");
        // Each of this nick's sessions here got its own copy from the room.
        let served = el.remove_child("sessions", ns::DMUC0).is_some();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        match stanza::stanza_type(&el) {
            Some("unavailable") => {
                // Only a leave the master marks as its eviction for link loss means it lost
                // track of one of ours; any other leave (a kick, an error the room kicked them
                // for) ends their stay, as the room shows it.
                let evicted = el.remove_child("evicted", ns::DMUC0).is_some();
                let lost_ours = r
                    .replica
                    .occupants
                    .get(nick)
                    .and_then(|o| o.local.clone())
                    .filter(|_| evicted && !final_leave(&el));
                let link_down = self.links.get(&r.master).is_some_and(|l| l.down);
                if lost_ours.is_some() && link_down {
                    // The resync after the outage rejoins them.
                    return;
                }
                if let Some(user) = lost_ours {
                    // The master lost track of one of our users (its link timeout, or an error
                    // it kicked them for): rejoin them, unseen by them.
                    info!(%room, %nick, "the master dropped a local occupant: rejoining");
                    if let Some(join) = r.replica.local.get(&user).map(|(_, j)| j.clone()) {
                        r.resync.insert(nick.to_string());
                        let join = self.rejoin(&join);
                        self.send(&join);
                    }
                    return;
                }
                if r.replica.occupants.remove(nick).is_none() {
                    return;
                }
                // Every local session of that nick sees its own leave (110), then is out. When the
                // room is destroyed, each occupant is shown only their own leave.
                // (Sessions the room served themselves got all of that from the room.)
                let sessions = r.replica.sessions_of(nick);
                let shown: Vec<String> = if served { Vec::new() } else { sessions.clone() };
                for user in &shown {
                    self.withdraw_room_presence(room, user);
                }
                let destroyed =
                    stanza::muc_user(&el).is_some_and(|x| x.has_child("destroy", ns::MUC_USER));
                if destroyed {
                    for user in &shown {
                        let mut own = el.clone();
                        stanza::set_attr(&mut own, "to", user);
                        stanza::add_status(&mut own, "110");
                        self.send(&own);
                    }
                } else {
                    self.fan_out_presence_except(room, nick, &el, served);
                }
                if let Some(r) = self.rooms.get_mut(room) {
                    for user in sessions {
                        r.replica.local.remove(&user);
                        r.direct.remove(&user);
                        self.recently_left.insert(user);
                    }
                }
                self.close_if_empty(room);
            }
            Some("error") => {
                if let Some(p) = r.pending.remove(nick) {
                    stanza::set_attr(&mut el, "to", p.user);
                    restore_join_echo(&mut el, &p.join);
                    self.send(&el);
                    self.close_if_empty(room);
                } else if let Some(user) =
                    r.replica.occupants.get(nick).and_then(|o| o.local.clone())
                {
                    if r.resync.contains(nick) {
                        stanza::set_attr(&mut el, "to", user);
                        self.send(&el);
                        self.rejoin_refused(now, room, nick);
                    }
                }
            }
            Some(_) => {}
            None => {
                let direct = r.pending.get(nick).is_some_and(|p| p.direct);
                if let Some(p) = r.pending.remove(nick).filter(|_| !direct) {
                    // The master admitted a pending join.
                    r.replica
                        .local
                        .insert(p.user.clone(), (nick.to_string(), p.join));
                    r.replica.occupants.insert(
                        nick.to_string(),
                        Occupant {
                            presence: current_presence(&el),
                            local: Some(p.user),
                        },
                    );
                    if r.sync == Sync::Ready {
                        self.serve_join(now, room, nick);
                    } else {
                        r.awaiting.push(nick.to_string());
                    }
                    return;
                }
                let local = r.replica.occupants.get(nick).and_then(|o| o.local.clone());
                if local.is_none() && stanza::has_status(&el, "110") {
                    // The master confirms a join of ours that we have since cancelled (the user
                    // left first, or it timed out): its leave follows; show nothing.
                    debug!(%room, %nick, "confirmation of a cancelled join ignored");
                    return;
                }
                if r.resync.remove(nick) {
                    // The echo of our own rejoin after a link loss: nothing changed for anyone here.
                    if let Some(o) = r.replica.occupants.get_mut(nick) {
                        o.presence = current_presence(&el);
                    }
                    if r.resync.is_empty() {
                        // What the master refused while it had lost our users goes first.
                        let refused = std::mem::take(&mut r.out.refused);
                        r.out.queue_first(refused);
                        match r.sync {
                            Sync::Ready => self.flush_queue(now, room, true),
                            Sync::Rejoin => self.request_history(now, room),
                            _ => {}
                        }
                    }
                    return;
                }
                r.replica.occupants.insert(
                    nick.to_string(),
                    Occupant {
                        presence: current_presence(&el),
                        local: local.clone(),
                    },
                );
                if local.is_some_and(|u| r.resent_joins.remove(&u)) {
                    // The echo of a re-sent join: the user gets the whole join again.
                    self.serve_join(now, room, nick);
                } else {
                    self.fan_out_presence_except(room, nick, &el, served);
                }
            }
        }
    }

    /// Serve a confirmed local join from the mirror's copy: the other occupants, the join itself
    /// to everyone (with 110 to the joiner), history, subject (XEP-0045 §7.2 order).
    pub(super) fn serve_join(&mut self, now: Timestamp, room: &str, nick: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(user) = r.replica.occupants.get(nick).and_then(|o| o.local.clone()) else {
            return;
        };
        if r.jids_withheld && r.replica.is_moderator(nick) && r.replica.whois != Whois::Anyone {
            // A moderator sees real JIDs the master kept back: ask for them, and serve the join
            // when they are here.
            if !r.awaiting.iter().any(|n| n == nick) {
                r.awaiting.push(nick.to_string());
            }
            self.reveal_if_needed(room);
            return;
        }
        // The occupant list: the other occupants, then what only the room's own list held.
        let listed = r.listed.remove(&user).unwrap_or_default();
        let mut occupants: Vec<Element> = r
            .replica
            .occupants
            .iter()
            .filter(|(n, _)| n.as_str() != nick)
            .map(|(other, o)| r.replica.presence_for(&o.presence, other, nick, &user))
            .collect();
        occupants.extend(listed);
        let limits = r.replica.history_limits(&user);
        let mut history = Vec::new();
        for e in room_history::select(r.replica.history.iter(), now, &limits) {
            let mut m = e.delayed(&r.replica.jid);
            stanza::set_attr(&mut m, "to", &user);
            history.push(m);
        }
        let mut subject = r.replica.subject.clone().unwrap_or_else(|| {
            let mut s = Element::builder("message", ns::JABBER_CLIENT).build();
            stanza::set_attr(&mut s, "from", &r.replica.jid);
            stanza::set_attr(&mut s, "type", "groupchat");
            s.append_child(Element::builder("subject", ns::JABBER_CLIENT).build());
            s
        });
        stanza::set_attr(&mut subject, "to", &user);
        let presence = r.replica.occupants.get(nick).map(|o| o.presence.clone());
        if let Some(mut p) = r.replica.room_presence.clone() {
            stanza::set_attr(&mut p, "to", &user);
            self.send(&p);
        }
        for p in occupants {
            self.send(&p);
        }
        if let Some(p) = presence {
            self.fan_out_presence(room, nick, &p, None);
        }
        for m in history {
            self.send(&m);
        }
        self.send(&subject);
    }

    pub(super) fn remote_groupchat(&mut self, now: Timestamp, mut el: Element, room: &str) {
        stanza::remove_attr(&mut el, "to");
        let down = self.is_down(room);
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.synced && (down || r.sync != Sync::Ready) {
            // Older messages may still come from the catch-up: this one waits behind them.
            if r.held.len() >= HELD {
                r.held.remove(0);
            }
            r.held.push(el);
            return;
        }
        r.seen.insert(fingerprint(&el));
        let is_subject = el.get_child("subject", ns::JABBER_CLIENT).is_some()
            && el.get_child("body", ns::JABBER_CLIENT).is_none();
        let text = stanza::serialize(&el);
        let name = el.name().to_string();
        let served = r.served();
        if is_subject {
            r.replica.set_subject(&el, now, true);
        } else {
            let entry = Entry::with_text(el, &text, now);
            r.newest_from_master = r.newest_from_master.max(Some(entry.stamp));
            if is_historic(&entry.message) {
                r.replica.history.push(entry);
            }
        }
        self.transmits.fan_out(text, &name, served);
    }

    pub(super) fn remote_iq(
        &mut self,
        now: Timestamp,
        iq: Element,
        room: &str,
    ) -> Result<(), Error> {
        let service = self.config.service.clone();
        let reply_to = iq.attr("from").unwrap_or_default().to_string();
        match stanza::stanza_type(&iq) {
            Some("set") => {
                if let Some(c) = iq.get_child("config", ns::DMUC0) {
                    match Config::try_from(c.clone()) {
                        Ok(config) => {
                            if let Some(r) = self.rooms.get_mut(room) {
                                let default_history = config
                                    .field("muc#roomconfig_defaulthistorymessages")
                                    .and_then(|v| v.parse().ok());
                                r.replica.apply_config(
                                    config.whois(),
                                    default_history,
                                    stanza_ids::signal(&config.form),
                                    RoomRules::of(&config.form),
                                );
                            }
                            self.send(&stanza::iq_result(&iq, &service));
                        }
                        Err(e) => {
                            let reply = stanza::error_reply(
                                &iq,
                                &service,
                                &reply_to,
                                Condition::BadRequest,
                                &e.to_string(),
                            );
                            self.send(&reply);
                        }
                    }
                } else if let Some(c) = iq.get_child("roster", ns::DMUC0) {
                    match Roster::try_from(c.clone()) {
                        Ok(roster) => {
                            self.send(&stanza::iq_result(&iq, &service));
                            let reveal = self.rooms.get(room).is_some_and(|r| r.reveal_pending);
                            if reveal {
                                self.apply_reveal(now, room, roster);
                            } else {
                                self.apply_roster(now, room, roster);
                            }
                        }
                        Err(e) => {
                            let reply = stanza::error_reply(
                                &iq,
                                &service,
                                &reply_to,
                                Condition::BadRequest,
                                &e.to_string(),
                            );
                            self.send(&reply);
                        }
                    }
                } else {
                    let reply = stanza::error_reply(
                        &iq,
                        &service,
                        &reply_to,
                        Condition::ServiceUnavailable,
                        "",
                    );
                    self.send(&reply);
                }
            }
            Some("result") | Some("error") => {
                let id = iq.attr("id").unwrap_or_default();
                let bounced = is_bounce(&iq);
                let roster_answer = self
                    .rooms
                    .get(room)
                    .and_then(|r| r.roster_iq.as_ref())
                    .is_some_and(|(h, _)| h == id);
                let history_answer = self
                    .rooms
                    .get(room)
                    .and_then(|r| r.history_iq.as_ref())
                    .is_some_and(|(h, _)| h == id);
                if bounced && (roster_answer || history_answer) {
                    let master = self.rooms.get(room).map(|r| r.master.clone());
                    if let Some(master) = master {
                        self.link_lost(now, &master);
                    }
                    return Ok(());
                }
                if roster_answer && stanza::stanza_type(&iq) == Some("error") {
                    // The master has no roster for us (it lost the room, or every one of our
                    // users): an empty roster, so that every local user rejoins.
                    info!(%room, "the master has no roster for this mirror: rejoining");
                    self.apply_roster(now, room, Roster::default());
                    return Ok(());
                }
                let ours = self
                    .rooms
                    .get(room)
                    .and_then(|r| r.history_iq.as_ref())
                    .is_some_and(|(h, _)| h == id);
                if ours {
                    let messages = iq
                        .get_child("history", ns::MUC)
                        .and_then(|h| HistoryResult::try_from(h.clone()).ok())
                        .map(|h| h.messages)
                        .unwrap_or_default();
                    if stanza::stanza_type(&iq) == Some("error") {
                        warn!(%room, "the master refused the history request");
                    }
                    self.apply_history(now, room, messages);
                }
            }
            _ => {
                let reply = stanza::error_reply(
                    &iq,
                    &service,
                    &reply_to,
                    Condition::ServiceUnavailable,
                    "",
                );
                self.send(&reply);
            }
        }
        Ok(())
    }
}

/// Put the user's own `<x xmlns='…muc'/>` back into an error that echoes the join the master got.
fn restore_join_echo(err: &mut Element, join: &Element) {
    let Some(original) = join.get_child("x", ns::MUC) else {
        return;
    };
    if !err.has_child("x", ns::MUC) {
        return;
    }
    for node in err.take_nodes() {
        let echo = node.as_element().is_some_and(|c| c.is("x", ns::MUC));
        if echo {
            err.append_child(original.clone());
        } else {
            err.append_node(node);
        }
    }
}
