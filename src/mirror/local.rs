//! Stanzas from local users to a mirrored room: joins, leaves, status changes and groupchat
//! messages. Joins wait for the master; messages are shown locally at once and sent (or queued).

use jid::Jid;
use minidom::Element;
use tracing::{debug, warn};

use super::classify::{is_historic, origin_id};
use super::room::{MirrorRoom, Pending};
use super::{round_of, Mirror, Verdict};
use crate::elements::Dmuc;
use crate::error::Error;
use crate::ns;
use crate::queue::Queued;
use crate::room_history::Entry;
use crate::stanza::{self, Condition};
use crate::stanza_ids::{self, Stamping};
use crate::time::Timestamp;

/// Leavers remembered for matching the room's own withdrawal of its presence.
const WITHDRAWN: usize = 1000;

/// Are these two full JIDs sessions of one account?
fn same_account(a: &str, b: &str) -> bool {
    let bare = |j: &str| j.split('/').next().unwrap_or_default().to_ascii_lowercase();
    bare(a) == bare(b)
}

impl Mirror {
    /// A join to an occupant address the host accepted but the engine cannot parse: a nick
    /// failing strict resourceprep (a code point unassigned in Unicode 3.2, say). Both hosts'
    /// rooms refuse it with `jid-malformed` by the room, echoing nothing; so does the mirror,
    /// rather than let it cross the link on its own (an ejabberd room answers it on the stream
    /// it came in on, which the users' Prosody then closes as a spoof). Anything else with such
    /// an address is the host's.
    pub(super) fn local_malformed_nick(&mut self, el: &Element, from: &Jid, to: &str) -> Verdict {
        let Some((bare, _)) = to.split_once('/') else {
            return Verdict::Pass;
        };
        let join = el.name() == "presence" && stanza::stanza_type(el).is_none();
        if !join || Jid::new(bare).is_err() {
            return Verdict::Pass;
        }
        let mut reply = Element::builder("presence", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut reply, "from", to);
        stanza::set_attr(&mut reply, "to", from.as_str());
        if let Some(id) = el.attr("id") {
            stanza::set_attr(&mut reply, "id", id);
        }
        stanza::set_attr(&mut reply, "type", "error");
        reply.append_child(stanza::error_element(
            Condition::JidMalformed,
            "Nickname must pass strict validation",
            bare,
        ));
        debug!(%to, "refused a join with a nick failing strict validation");
        self.send(&reply);
        Verdict::Consumed
    }

    /// An unavailable presence to the bare room JID: a leave of the user's current nick (or of
    /// their join under way), as XEP-0045 servers take it. Anything else is the master's.
    pub(super) fn local_bare_leave(
        &mut self,
        now: Timestamp,
        mut el: Element,
        from: Jid,
        room: String,
    ) -> Result<Verdict, Error> {
        let user = from.to_string();
        let nick = self.rooms.get(&room).and_then(|r| {
            r.replica
                .local
                .get(&user)
                .map(|(n, _)| n.clone())
                .or_else(|| {
                    r.pending
                        .iter()
                        .find(|(_, p)| p.user == user)
                        .map(|(n, _)| n.clone())
                })
        });
        let Some(nick) = nick else {
            return Ok(Verdict::Pass);
        };
        if !self.is_down(&room) {
            // The rooms differ in what they answer (ejabberd also sends an unavailable from the
            // bare room first): the room's own answer is the one to show. The marker asks the
            // master to echo the leave, which the mirror has not shown.
            let fwd = self.unshown(el);
            self.send(&fwd);
            return Ok(Verdict::Consumed);
        }
        // While the link is down the mirror is the room: a leave of the current nick.
        stanza::set_attr(&mut el, "to", format!("{room}/{nick}"));
        self.local_presence(now, el, from, room, nick)
    }

    /// A leave for the master to show: marked (`<dmuc from='mirror'/>`) as one the mirror has
    /// not shown its users, so the room's broadcast of it comes back.
    fn unshown(&self, mut el: Element) -> Element {
        while el.remove_child("dmuc", ns::DMUC).is_some() {}
        if let Ok(service) = Jid::new(&self.config.service) {
            el.append_child(Dmuc { from: service }.into());
        }
        el
    }

    /// A presence probe from an occupant to an occupant JID: the room answers with that
    /// occupant's current presence as the prober may see it (no status 110, even for their own).
    /// The replica has it; a nick it does not know is the master's to answer.
    pub(super) fn local_probe(&mut self, user: &str, room: &str, nick: &str) -> Verdict {
        let Some(r) = self.rooms.get(room) else {
            return Verdict::Pass;
        };
        let (Some((prober, _)), Some(probed)) =
            (r.replica.local.get(user), r.replica.occupants.get(nick))
        else {
            return Verdict::Pass;
        };
        if !r.replica.rules.answers_probes {
            // The room ignores probes of its occupants (ejabberd): so does its replica, and the
            // link stays quiet.
            return Verdict::Consumed;
        }
        // The room answers with the stored presence as it is, its id included.
        let mut p = r.replica.presence_for(&probed.presence, nick, prober, user);
        stanza::strip_self_status(&mut p);
        self.send(&p);
        Verdict::Consumed
    }

    /// A room with a presence of its own (ejabberd) withdraws it from a leaver, before their
    /// leave. The room's own withdrawal, should it come through the mirror later, is not shown
    /// twice.
    pub(super) fn withdraw_room_presence(&mut self, room: &str, user: &str) {
        let Some(r) = self
            .rooms
            .get(room)
            .filter(|r| r.replica.room_presence.is_some())
        else {
            return;
        };
        if self.room_withdrew.remove(user) {
            // The room sent its own withdrawal first (a leave to the bare room JID).
            return;
        }
        let mut p = Element::builder("presence", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut p, "from", &r.replica.jid);
        stanza::set_attr(&mut p, "to", user);
        stanza::set_attr(&mut p, "type", "unavailable");
        self.next_id += 1;
        stanza::set_attr(&mut p, "id", format!("dmuc-leave-{}", self.next_id));
        if self.withdrawn.len() >= WITHDRAWN {
            // The room did not send its own withdrawal through the mirror: nothing to match.
            self.withdrawn.clear();
        }
        self.withdrawn.insert(user.to_string());
        self.send(&p);
    }

    /// An XEP-0410 self-ping. While the link is down the user is still in the mirror's room, so
    /// the mirror answers as the room would (an empty result from the occupant JID); otherwise
    /// the master answers.
    pub(super) fn local_ping(
        &mut self,
        el: &Element,
        from: &Jid,
        room: &str,
        nick: &str,
    ) -> Verdict {
        let user = from.to_string();
        let joined = self
            .rooms
            .get(room)
            .and_then(|r| r.replica.local.get(&user))
            .is_some_and(|(n, _)| n == nick);
        if !joined || !self.is_down(room) {
            return Verdict::Pass;
        }
        let mut reply = Element::builder("iq", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut reply, "from", format!("{room}/{nick}"));
        stanza::set_attr(&mut reply, "to", user);
        if let Some(id) = el.attr("id") {
            stanza::set_attr(&mut reply, "id", id);
        }
        stanza::set_attr(&mut reply, "type", "result");
        self.send(&reply);
        Verdict::Consumed
    }

    pub(super) fn local_presence(
        &mut self,
        now: Timestamp,
        el: Element,
        from: Jid,
        room: String,
        nick: String,
    ) -> Result<Verdict, Error> {
        let user = from.to_string();
        let master_down = self.is_down(&room);
        let kind = stanza::stanza_type(&el).map(str::to_string);
        let current = self
            .rooms
            .get(&room)
            .and_then(|r| r.replica.local.get(&user))
            .map(|(n, _)| n.clone());
        match kind.as_deref() {
            Some("unavailable") => {
                let Some(current) = current else {
                    // A leave from a user whose join is still pending: cancel it, and tell the master.
                    if let Some(r) = self.rooms.get_mut(&room) {
                        r.pending.retain(|_, p| p.user != user);
                    }
                    if !master_down {
                        self.send(&el);
                    }
                    self.close_if_empty(&room);
                    return Ok(Verdict::Consumed);
                };
                let shared = self.rooms.get(&room).is_some_and(|r| r.shared(&current));
                if shared && !master_down {
                    // The nick has several sessions here: the room shows this leave to each of
                    // them as it makes it, and the mirror relays that.
                    let fwd = self.unshown(el);
                    self.send(&fwd);
                    return Ok(Verdict::Consumed);
                }
                self.local_leave(&room, &user, &current, &el);
                if master_down {
                    // The master hears of it after the messages this user sent before leaving.
                    if let Some(r) = self.rooms.get_mut(&room) {
                        // A leave is of the user's current nick, whatever nick it named.
                        let mut el = el;
                        stanza::set_attr(&mut el, "to", format!("{room}/{current}"));
                        let item = Queued {
                            user: user.clone(),
                            nick: current.clone(),
                            at: now,
                            stanza: el,
                            round: 0,
                            seq: self.store.next_seq(),
                        };
                        self.store.put(&room, &item, None);
                        r.out.queue.push_back(item);
                    }
                } else {
                    self.send(&el);
                }
                self.close_if_empty(&room);
                Ok(Verdict::Consumed)
            }
            Some("probe") => Ok(self.local_probe(&user, &room, &nick)),
            Some(_) => Ok(Verdict::Pass),
            None => {
                if let Some(current) = current {
                    if current != nick {
                        let reply = stanza::error_reply(
                            &el,
                            &format!("{room}/{nick}"),
                            &user,
                            Condition::NotAcceptable,
                            "Nick changes are not allowed in a mirrored room",
                        );
                        self.send(&reply);
                        return Ok(Verdict::Consumed);
                    }
                    // A status change: the master confirms it to everyone, us included.
                    let Some(r) = self.rooms.get_mut(&room) else {
                        return Ok(Verdict::Consumed);
                    };
                    if let Some(entry) = r.replica.local.get_mut(&user) {
                        entry.1 = el.clone();
                    }
                    let direct = r.direct.contains(&user);
                    if el.has_child("x", ns::MUC) && !master_down && !direct {
                        // A re-sent join (a client resyncing, Prosody issue 667): the room
                        // answers it as a join, so the master's echo is served as one.
                        r.resent_joins.insert(user.clone());
                    } else {
                        r.resent_joins.remove(&user);
                    }
                    if master_down {
                        self.local_status(&room, &nick, &el);
                    } else {
                        let fwd = self.to_master(&el);
                        self.send(&fwd);
                    }
                    return Ok(Verdict::Consumed);
                }
                self.local_join(now, el, user, room, nick, master_down)
            }
        }
    }

    pub(super) fn local_join(
        &mut self,
        now: Timestamp,
        el: Element,
        user: String,
        room: String,
        nick: String,
        master_down: bool,
    ) -> Result<Verdict, Error> {
        let occupant_jid = format!("{room}/{nick}");
        if master_down {
            let reply = stanza::error_reply(
                &el,
                &occupant_jid,
                &user,
                Condition::RemoteServerTimeout,
                "The link to this room is down",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        let master = Jid::new(&room)
            .map(|j| j.domain().to_string())
            .unwrap_or_default();
        let full = match self.rooms.get(&room) {
            Some(r) => r.replica.local.len() + r.pending.len() >= self.config.max_local_occupants,
            None => self.rooms.len() >= self.config.max_rooms,
        };
        if full {
            warn!(%room, %user, "a local join refused: this mirror is at its limit");
            let reply = stanza::error_reply(
                &el,
                &occupant_jid,
                &user,
                Condition::ResourceConstraint,
                "This server's mirror of the room is full",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        let history_size = self.config.history_size;
        let deadline = now.plus_ms(self.config.join_timeout_ms);
        let fwd = self.to_master(&el);
        let r = self
            .rooms
            .entry(room.clone())
            .or_insert_with(|| MirrorRoom::new(room.clone(), master, history_size));
        // Another device of the same account may share the nick (multi-session nicks, which
        // Prosody allows): the master decides, and serves that session itself. Anyone else
        // holding it is a conflict.
        let held_by = r.replica.occupants.get(&nick).map(|o| o.local.clone());
        let taken = held_by.as_ref().is_some_and(|local| {
            local
                .as_deref()
                .is_none_or(|u| u != user && !same_account(u, &user))
        }) || r.pending.get(&nick).is_some_and(|p| p.user != user);
        let direct = held_by.flatten().is_some_and(|u| u != user);
        if taken {
            let reply = stanza::error_reply(&el, &occupant_jid, &user, Condition::Conflict, "");
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        debug!(%room, %nick, "forwarding a local join");
        let master = r.master.clone();
        // The link's rounds go when it is quiet (crate::link), counted from this join.
        self.links.entry(master).or_default();
        let Some(r) = self.rooms.get_mut(&room) else {
            return Ok(Verdict::Consumed);
        };
        r.pending.insert(
            nick,
            Pending {
                user,
                deadline,
                join: el,
                direct,
            },
        );
        self.send(&fwd);
        Ok(Verdict::Consumed)
    }

    /// The user's join as the master gets it: `<x/>` without `<history/>` (the mirror serves
    /// history), plus `<dmuc from='mirror'/>`.
    pub(super) fn to_master(&self, el: &Element) -> Element {
        let mut fwd = el.clone();
        if let Some(x) = fwd.get_child_mut("x", ns::MUC) {
            let mut rebuilt = Element::builder("x", ns::MUC).build();
            for c in x.children().filter(|c| !c.is("history", ns::MUC)) {
                rebuilt.append_child(c.clone());
            }
            *x = rebuilt;
        }
        while fwd.remove_child("dmuc", ns::DMUC).is_some() {}
        if let Ok(service) = Jid::new(&self.config.service) {
            fwd.append_child(Dmuc { from: service }.into());
        }
        fwd
    }

    pub(super) fn local_leave(&mut self, room: &str, user: &str, nick: &str, el: &Element) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.replica.local.remove(user);
        r.direct.remove(user);
        self.recently_left.insert(user.to_string());
        self.withdraw_room_presence(room, user);
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(other) = r.replica.sessions_of(nick).into_iter().next() {
            // Another session keeps the nick (multi-session): only the leaver sees a leave; the
            // master's broadcast of the occupant's remaining presence follows for everyone.
            if let Some(o) = r.replica.occupants.get_mut(nick) {
                o.local = Some(other);
            }
            let mut gone = r.replica.leave_of(nick, Some(el), &[]);
            stanza::set_attr(&mut gone, "to", user);
            stanza::add_status(&mut gone, "110");
            self.send(&gone);
            return;
        }
        let gone = r.replica.leave_of(nick, Some(el), &[]);
        r.replica.occupants.remove(nick);
        self.fan_out_presence(room, nick, &gone, Some(user));
    }

    pub(super) fn local_status(&mut self, room: &str, nick: &str, el: &Element) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(o) = r.replica.occupants.get_mut(nick) else {
            return;
        };
        let mut p = el.clone();
        stanza::remove_attr(&mut p, "to");
        stanza::set_attr(&mut p, "from", format!("{room}/{nick}"));
        while p.remove_child("x", ns::MUC).is_some() {}
        if let Some(x) = stanza::muc_user(&o.presence) {
            p.append_child(x.clone());
        }
        o.presence = p.clone();
        self.fan_out_presence(room, nick, &p, None);
    }

    /// Send `presence` about `subject` to every local occupant (and to `extra`, a user who has
    /// just left, who sees their own leave).
    pub(super) fn fan_out_presence(
        &mut self,
        room: &str,
        subject: &str,
        presence: &Element,
        extra: Option<&str>,
    ) {
        self.fan_out(room, subject, presence, extra, false);
    }

    /// [`Mirror::fan_out_presence`] of a copy the master marked: each of the subject's sessions
    /// here got its own copy from the room (multi-session nicks), so only the others get this.
    pub(super) fn fan_out_presence_except(
        &mut self,
        room: &str,
        subject: &str,
        presence: &Element,
        subject_served: bool,
    ) {
        self.fan_out(room, subject, presence, None, subject_served);
    }

    fn fan_out(
        &mut self,
        room: &str,
        subject: &str,
        presence: &Element,
        extra: Option<&str>,
        subject_served: bool,
    ) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let mut out = Vec::new();
        for (user, (nick, _)) in &r.replica.local {
            // A direct session gets the room's own copies of everything.
            if r.direct.contains(user) || (subject_served && nick == subject) {
                continue;
            }
            out.push(r.replica.presence_for(presence, subject, nick, user));
        }
        if let Some(user) = extra {
            let mut p = presence.clone();
            stanza::set_attr(&mut p, "to", user);
            stanza::add_status(&mut p, "110");
            out.push(p);
        }
        for p in out {
            self.send(&p);
        }
    }

    pub(super) fn local_groupchat(
        &mut self,
        now: Timestamp,
        el: Element,
        from: Jid,
        room: String,
    ) -> Result<Verdict, Error> {
        let user = from.to_string();
        let down = self.is_down(&room);
        let queue_limit = self.config.queue_limit;
        let nick = self
            .rooms
            .get(&room)
            .and_then(|r| r.replica.local.get(&user))
            .map(|(n, _)| n.clone());
        let (Some(r), Some(nick)) = (self.rooms.get_mut(&room), nick) else {
            let reply = stanza::error_reply(
                &el,
                &room,
                &user,
                Condition::NotAcceptable,
                "You are not in this room",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        };
        if el.get_child("subject", ns::JABBER_CLIENT).is_some() {
            // A subject change needs the master's permission: it comes back as a broadcast.
            if down {
                let reply = stanza::error_reply(
                    &el,
                    &room,
                    &user,
                    Condition::RemoteServerTimeout,
                    "The link to this room is down",
                );
                self.send(&reply);
            } else {
                self.send(&el);
            }
            return Ok(Verdict::Consumed);
        }
        if r.replica
            .occupants
            .get(&nick)
            .is_some_and(|o| o.role() == "visitor")
        {
            let reply = stanza::error_reply(
                &el,
                &room,
                &user,
                Condition::Forbidden,
                "Visitors may not speak in this room",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        // A client may not set the room's stanza-id (the room strips it), nor propose one.
        let mut el = el;
        stanza_ids::strip_forged(&mut el, &room);
        let original = el.clone();
        if origin_id(&el).is_none() {
            // The master's de-duplication key, should this message have to be sent again. In
            // dmuc's namespace, not an XEP-0359 origin-id: the master strips it, and the room's
            // occupants get the message as the client wrote it.
            self.next_id += 1;
            let mut o = Element::builder("dedup", ns::DMUC0).build();
            stanza::set_attr(&mut o, "id", format!("dmuc-{:x}-{}", now.0, self.next_id));
            el.append_child(o);
        }
        // While older messages still wait for the link (a resync is under way), a new one waits
        // behind them: the master gets each sender's messages in order.
        let hold = r.out.must_hold(down);
        if down {
            // Someone is talking: if the link is back, find out now, not at the next probe.
            if let Some(link) = self.links.get_mut(&r.master) {
                link.probe_now(now);
            }
        }
        // The room has not archived this message yet, so its copies here would lack the room's
        // stanza-id: we propose one, which the master's archive adopts (see stanza_ids). It
        // travels inside the stanza, so a queued or resent message keeps it.
        let stamp = is_historic(&el)
            && r.replica
                .stamping
                .is_some_and(|s: Stamping| !(s.fresh_only && hold));
        let stanza_id = stamp.then(|| self.stanza_ids.next(now));
        if let Some(id) = &stanza_id {
            el.append_child(stanza_ids::proposal_element(id));
        }
        let round = round_of(&self.links, &r.master);
        if hold && r.out.queue.len() + r.out.in_flight.len() >= queue_limit {
            warn!(%room, "outbound queue full: message refused");
            let reply = stanza::error_reply(
                &el,
                &room,
                &user,
                Condition::ResourceConstraint,
                "The link to this room is down and the queue is full",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        // Stored until a ping answer acknowledges it, whether it goes now or waits: a restart
        // before then must not lose it. One that goes now is held back from the store for
        // `store_after`: acknowledged by then, it never reaches it (write-behind, see store).
        let due = (!hold && self.config.store_after_ms > 0)
            .then(|| now.plus_ms(self.config.store_after_ms));
        let master = r.master.clone();
        let item = Queued {
            user: user.clone(),
            nick: nick.clone(),
            at: now,
            stanza: el.clone(),
            round,
            seq: self.store.next_seq(),
        };
        self.store.put(&r.replica.jid, &item, due);
        if hold {
            r.out.queue.push_back(item);
        } else {
            r.out.send(now, item);
        }
        // Local users see the message as its sender wrote it (our origin-id and proposal are
        // for the master).
        let mut shown = original;
        stanza::set_attr(&mut shown, "from", r.replica.occupant_jid(&nick));
        stanza::remove_attr(&mut shown, "to");
        while shown.remove_child("delay", ns::DELAY).is_some() {}
        // The room stamps each message with its sender's XEP-0421 occupant-id (and drops any the
        // client set, against forgery); the replica has it from the occupant's presence.
        while shown.remove_child("occupant-id", ns::OCCUPANT_ID).is_some() {}
        if let Some(id) = r.replica.occupant_id(&nick) {
            shown.append_child(id);
        }
        if let Some(id) = &stanza_id {
            shown.append_child(stanza_ids::stanza_id_element(&r.replica.jid, id));
            if r.replica.stamping.is_some_and(|s| s.archived) {
                shown.append_child(stanza_ids::archived_element(&r.replica.jid, id));
            }
        }
        let text = stanza::serialize(&shown);
        let name = shown.name().to_string();
        // A direct session (a second device on a nick) gets the room's own copy instead.
        let served = r.served();
        let element = shown.clone();
        if is_historic(&shown) {
            r.replica.history.push(Entry::with_text(shown, &text, now));
        }
        self.transmits
            .fan_out_with(text, &name, served, Some(element));
        if !hold {
            self.send(&el);
            self.ask_early_ack(&master);
        }
        Ok(Verdict::Consumed)
    }
}
