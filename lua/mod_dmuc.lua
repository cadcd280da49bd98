-- mod_dmuc: Distributed MUC (DMUC3) for Prosody.
--
-- A thin shim over the dmuc engine (dmuc_prosody.so, built from Rust, found next to this file).
-- It forwards host events into the engine and routes what comes back. No protocol logic lives
-- here: it is written and tested once, in the engine.
--
-- The role comes from where the module is loaded:
--   * on a MUC component (Component "conference.x" "muc", modules_enabled = { "dmuc" }): master;
--   * as a component of its own (Component "mirror.x" "dmuc"): mirror;
--   * on a VirtualHost: hands local users' stanzas for mirrored services to the mirror.

local st = require "util.stanza";
local jid_resource = require "util.jid".resource;
local jid_split = require "util.jid".split;
local time_now = require "util.time".now;

local DMUC_FEATURE = "http://tridsys.com/protocol/dmuc";

-- The native module, loaded from this module's own folder (no global path edits).
local open, load_err = package.loadlib(module:get_directory() .. "/dmuc_prosody.so", "luaopen_dmuc_prosody");
if not open then
	error("mod_dmuc: cannot load dmuc_prosody.so from " .. module:get_directory() .. ": " .. tostring(load_err));
end
local native = open();
-- Each engine's lines go to its own module:log, under the host it serves.
local function engine_log(level, message) module:log(level, "%s", message) end

-- The shim's own refusals are logged at warn at most once per peer a minute, as the engine's
-- are: a flood of bad stanzas costs a line, not a line each.
-- A peer is a user of this server (who cannot forge their JID) or a remote domain (whose
-- server makes up the rest).
local refusals = native.refusals(60);
local function log_refusal(stanza, line)
	local node, peer = jid_split(stanza.attr.from);
	if node and peer and prosody.hosts[peer] then peer = node .. "@" .. peer; end
	local ok, left_out = refusals:allow(peer or "", time_now());
	if not ok then return end
	if left_out > 0 then line = string.format("%s (and %d more from %s since the last)", line, left_out, peer or "?"); end
	module:log("warn", "%s", line);
end

-- Engine output is XML text; Prosody routes stanza objects, in the stream's default namespace.
-- The native module builds them (util.xml's parser, expat calling back into Lua per element,
-- was a quarter of a mirror's CPU under a flood), as util.xml would, but for the stream's
-- namespace: an element in the stanza's namespace under a parent in it carries no xmlns (a
-- <body xmlns='jabber:client'/> inside a jabber:server s2s stream is no body to the receiver);
-- inside a foreign wrapper (<forwarded/>, <history/>, a roster item) a jabber:client element
-- keeps it, as it must.
native.set_stanza_mt(st.stanza_mt);
local function to_stanza(text)
	local stanza, err = native.parse_stanza(text);
	if not stanza then
		module:log("error", "engine produced unparsable XML (%s): %s", err, text);
		return nil;
	end
	return stanza;
end

-- Bounded input (docs/security.md, "Bounded input"). util.stanza's tostring, and every tree walk
-- after it, recurse once per level of nesting; the engine refuses deep text too, but the text
-- must first be made. So the native module writes the text (as tostring does) and counts depth
-- as it goes, stopping one level past the limit: a 100,000-level stanza costs what its first
-- levels do. Size is checked on the text.
local max_depth = module:get_option_number("dmuc_max_stanza_depth", native.limits.depth);
local max_size = module:get_option_number("dmuc_max_stanza_size", native.limits.size);

-- Does the stanza nest deeper than `limit`? Counted without recursion (an explicit stack that
-- stops one level past the limit), for stanzas dmuc does not hand the engine (the depth guard).
local function deeper_than(stanza, limit)
	local stack, depths, n = { stanza }, { 1 }, 1;
	while n > 0 do
		local el, d = stack[n], depths[n];
		stack[n], depths[n], n = nil, nil, n - 1;
		if d > limit then return true end
		local tags = el.tags;
		if tags then
			for i = 1, #tags do
				n = n + 1;
				stack[n], depths[n] = tags[i], d + 1;
			end
		end
	end
	return false;
end

-- The stanza as text for the engine, or nil and why it is refused.
local function bounded_text(stanza)
	local text = native.stanza_text(stanza, max_depth);
	if not text then
		return nil, string.format("stanza nests deeper than %d levels", max_depth);
	end
	if #text > max_size then
		return nil, string.format("stanza of %d bytes exceeds the limit of %d bytes", #text, max_size);
	end
	return text;
end

-- A stanza past the limits: logged at warn and answered with policy-violation (RFC 6120 8.3.3.12),
-- unless it is an error or a result itself. The reply carries none of the payload.
local function refuse(origin, stanza, why)
	local a = stanza.attr;
	log_refusal(stanza, string.format("dmuc refused a %s from %s to %s: %s", stanza.name, tostring(a.from), tostring(a.to), why));
	if a.type ~= "error" and a.type ~= "result" then
		local reply = st.error_reply(stanza, "modify", "policy-violation", why);
		if origin and origin.type == "c2s" and origin.send then origin.send(reply) else module:send(reply) end
	end
end

-- Did the engine's last failure come from inside it (a panic, which mlua turns into a Lua
-- error carrying the panic's message) rather than from its refusing the input ("dmuc: ...")?
local last_failure_internal = false;

-- Call into the engine with `stanza`'s text (or none); an error is logged, never raised into
-- Prosody's stanza processing. A refusal is the sender's: logged once per peer a minute.
local function call_for(stanza, engine, method, ...)
	local result = table.pack(pcall(engine[method], engine, ...));
	if not result[1] then
		local why = tostring(result[2]);
		last_failure_internal = not why:find("dmuc: ", 1, true);
		if last_failure_internal then
			module:log("error", "dmuc %s failed inside the engine: %s", method, why);
		elseif stanza then
			log_refusal(stanza, string.format("dmuc %s refused input from %s: %s", method, tostring(stanza.attr.from), why));
		else
			module:log("warn", "dmuc %s refused input: %s", method, why);
		end
		return nil, why;
	end
	return table.unpack(result, 2, result.n);
end

local function call(engine, method, ...) return call_for(nil, engine, method, ...) end

-- Answer a stanza the engine could not take with an XMPP error, so nothing is silently lost:
-- bad-request for input the engine refused, internal-server-error for its own failure.
local function bounce(origin, stanza, text)
	if stanza.attr.type ~= "error" and stanza.attr.type ~= "result" then
		local reply = last_failure_internal
			and st.error_reply(stanza, "cancel", "internal-server-error", "Internal error in dmuc")
			or st.error_reply(stanza, "modify", "bad-request", text);
		if origin and origin.send then origin.send(reply) else module:send(reply) end
	end
end

-- A fan-out (the same stanza for each of `recipients`) is parsed once and routed once per
-- recipient, its `to` set in turn, as a MUC room routes a broadcast (room_mt:route_to_occupant):
-- each copy is on its way before the next is addressed. Parsing a copy per recipient was most of
-- the mirror's CPU under a flood.
local function drain(engine)
	local poll = engine.poll_transmit_stanza;
	while true do
		local stanza, recipients;
		if poll then
			-- The mirror hands over stanza objects (no text to parse).
			local ok, s, r = pcall(poll, engine);
			if not ok then
				-- Only the engine's own text failing to parse: that one stanza is lost.
				module:log("error", "dmuc engine output lost: %s", tostring(s));
			elseif not s then
				break;
			else
				stanza, recipients = s, r;
			end
		else
			local text, r = engine:poll_transmit_batch();
			if not text then break end
			stanza, recipients = to_stanza(text), r;
		end
		if stanza and recipients then
			for _, to in ipairs(recipients) do
				stanza.attr.to = to;
				module:send(stanza);
			end
		elseif stanza then
			module:send(stanza);
		end
	end
end

-- One timer at the engine's earliest deadline; `on_fire` runs the engine's handle_timeout.
local function timer_for(engine, on_fire)
	local timer_at;
	local function schedule()
		local at = engine:poll_timeout();
		if at and (not timer_at or at < timer_at) then
			timer_at = at;
			module:add_timer(math.max(0, at - time_now()), function()
				timer_at = nil;
				on_fire(time_now());
				schedule();
			end);
		end
	end
	return schedule;
end

-- `prosodyctl shell` gets `dmuc:status()`: every dmuc host on this server adds its lines.
local status_lines = module:shared("/*/dmuc/status");
local shell_env = module:shared("/*/admin_shell/env");
shell_env.dmuc = {
	status = function(self)
		local n = 0;
		for host, lines in pairs(status_lines) do
			for _, line in ipairs(lines()) do
				self.session.print(host .. ": " .. line);
				n = n + 1;
			end
		end
		return true, n .. " link(s)";
	end;
};

local function ago(t)
	if not t then return "never" end
	return string.format("%.0fs ago", time_now() - t);
end

local host_type = module:get_host_type();
local component_module = module:get_option_string("component_module");

if host_type == "component" and component_module == "muc" then
	---------------------------------------------------------------- master
	local trusted = module:get_option("dmuc_trusted_mirrors", {});

	-- Every stanza for this room service is bounded in depth before the room sees it, as
	-- ejabberd's stream guard does: Prosody's MUC copies a private message recursively
	-- (st.clone), and a deep one overflows the Lua stack there; the stanza is dropped and its
	-- sender hears nothing. Refused here, the sender gets policy-violation.
	local function depth_guard(event)
		local stanza = event.stanza;
		if deeper_than(stanza, max_depth) then
			refuse(event.origin, stanza, string.format("stanza nests deeper than %d levels", max_depth));
			return true;
		end
	end
	for _, kind in ipairs({ "message", "presence", "iq" }) do
		for _, to in ipairs({ "bare", "full", "host" }) do
			module:hook(kind .. "/" .. to, depth_guard, 2000);
		end
	end

	-- Stanza-ids (docs/protocol.md, "Stanza ids"): a mirror proposes the id of its user's
	-- message and has shown it to its users already; the room's archive must file the message
	-- under it. mod_muc_mam files it with archive:append(room_node, nil, ...) in its
	-- muc-add-history handler, the nil asking the driver for a new key. Stores opened on this
	-- host share their driver's method table, so wrapping its append lets us give that one call
	-- the key, while `adopting` is set: from just before mod_muc_mam's handler (priority 0) to
	-- just after it, for that message only. mod_muc_mam then puts the id on the broadcast and
	-- on the room's history, as for any message.
	local adopting; -- { node = room node, id = message id attribute, key = adopted id }
	local archive_methods, original_append, adopting_append;
	do
		local store = module:open_store("muc_log", "archive");
		local mt = store and getmetatable(store);
		local methods = mt and type(mt.__index) == "table" and mt.__index;
		if methods and type(methods.append) == "function" then
			archive_methods, original_append = methods, methods.append;
			adopting_append = function(self, username, key, value, ...)
				local a = adopting;
				if a and key == nil and username == a.node and st.is_stanza(value)
					and value.name == "message" and value.attr.id == a.id then
					key = a.key;
				end
				return original_append(self, username, key, value, ...);
			end
			methods.append = adopting_append;
		else
			module:log("warn", "the muc_log archive driver cannot be given keys: mirrors' stanza-ids are not adopted");
		end
	end

	local ok, master = pcall(native.master, {
		log = engine_log;
		trusted_mirrors = trusted;
		link_timeout = module:get_option("dmuc_link_timeout");
		max_rooms_per_mirror = module:get_option("dmuc_max_rooms_per_mirror");
		mirror_join_rate = module:get_option("dmuc_mirror_join_rate");
		mirror_join_burst = module:get_option("dmuc_mirror_join_burst");
		adopt_stanza_ids = archive_methods ~= nil;
		max_stanza_depth = max_depth;
		max_stanza_size = max_size;
	});
	if not ok then error("mod_dmuc: " .. tostring(master)); end

	local mod_muc = module:depends("muc");
	local room_mt = mod_muc.room_mt;

	module:add_feature(DMUC_FEATURE);
	module:hook("muc-disco#info", function(event)
		event.reply:tag("feature", { var = DMUC_FEATURE }):up();
	end);

	local function evict(action)
		local room = mod_muc.get_room_from_jid(action.room);
		local occupant = room and room:get_occupant_by_nick(action.room .. "/" .. action.nick);
		if not occupant then return end
		-- Show the occupant leaving for a technical reason (XEP-0045 status 333).
		local x = st.stanza("x", { xmlns = "http://jabber.org/protocol/muc#user" })
			:tag("status", { code = "333" }):up();
		local prev_role = occupant.role;
		occupant.role = nil;
		room:save_occupant(occupant);
		-- prev_role: the room shows the leave to those who saw the occupant (as for a kick).
		room:publicise_occupant_status(occupant, x, nil, nil, nil, prev_role);
		module:fire_event("muc-occupant-left", { room = room; nick = occupant.nick; occupant = occupant });
	end

	-- The room's config form as an owner gets it. The actor `true` is no JID, so no server admin:
	-- fields shown only to admins (restrict_room_persistence...) are left out, and none of them
	-- matters to a mirror. :form(nil, "form") writes each field's current value (a list-single's
	-- from its default option; a boolean that is unset gets none).
	-- The engine tells mirrors whether the room archives from the form's archiving field;
	-- mod_muc_mam adds none when it archives every room (muc_log_all_rooms), so we do.
	local log_all_rooms = module:get_option_boolean("muc_log_all_rooms", false);
	local modulemanager = require "core.modulemanager";
	local function config_form(room)
		local form = room:get_form_layout(true):form(nil, "form");
		if log_all_rooms and modulemanager.is_loaded(module.host, "muc_mam") then
			local has = false;
			-- Fields carry no xmlns of their own (childtags would not match them).
			for _, field in ipairs(form.tags) do
				if field.name == "field" and field.attr.var == "muc#roomconfig_enablearchiving" then has = true; end
			end
			if not has then
				form:tag("field", { var = "muc#roomconfig_enablearchiving", type = "boolean" })
					:text_tag("value", "1"):up();
			end
		end
		return tostring(form);
	end

	-- The room announced a config change: the engine holds the announcement until it has the form.
	local function config_changed(action)
		local room = mod_muc.get_room_from_jid(action.room);
		call(master, "handle_config", time_now(), action.room, room and config_form(room) or nil);
	end

	local schedule;
	local function drain_master()
		while true do
			drain(master);
			local action = master:poll_action();
			if not action then break end
			if action.kind == "evict" then evict(action);
			elseif action.kind == "config" then config_changed(action); end
		end
		schedule();
	end
	-- A mirror whose pings stop is lost: the engine's timer evicts its occupants.
	schedule = timer_for(master, function(now)
		master:handle_timeout(now);
		drain_master();
	end);

	local measure_mirrors_up = module:measure("mirrors_up", "amount");
	local measure_mirrors_down = module:measure("mirrors_down", "amount");
	status_lines[module.host] = function()
		local lines, up, down = {}, 0, 0;
		for _, s in ipairs(master:status()) do
			if s.up then up = up + 1 else down = down + 1 end
			table.insert(lines, string.format("mirror %s %s, %d occupant(s) in %d room(s), last ping %s, %d outage(s)",
				s.mirror, s.up and "up" or "DOWN", s.occupants, s.rooms, ago(s.last_seen), s.outages));
		end
		measure_mirrors_up(up); measure_mirrors_down(down);
		return lines;
	end;

	-- Pings from mirrors prove their link alive; the engine answers them. Answers to the
	-- engine's own probes (below) come here too.
	module:hook("iq/host", function(event)
		local stanza = event.stanza;
		local t = stanza.attr.type;
		local answer = t == "result" or t == "error";
		if not answer and (t ~= "get" or not stanza:get_child("ping", "urn:xmpp:ping")) then return end
		local text, why = bounded_text(stanza);
		if not text then refuse(event.origin, stanza, why); return true; end
		local mine = call_for(stanza, master, "handle_ping", time_now(), text);
		drain_master();
		status_lines[module.host]();
		if mine then return true; end
	end, 100);

	-- An s2s session of this service closed (a reset, a write error, or just idle): if it was
	-- with a mirror or its users' domain, the engine probes the mirror, and evicts its occupants
	-- if the probe goes unanswered. Only authenticated sessions fire these events.
	local function s2s_closed(event)
		local session = event.session;
		local remote = session and (session.direction == "outgoing" and session.to_host or session.from_host);
		if remote then
			call(master, "handle_s2s_closed", time_now(), module.host, remote);
			drain_master();
		end
	end
	module:hook("s2sout-destroyed", s2s_closed);
	module:hook("s2sin-destroyed", s2s_closed);

	-- A message a mirror sent again after an outage, which the room already has: drop it. A
	-- message whose mirror proposed a stanza-id the engine accepts is archived under it.
	local adopt_for = setmetatable({}, { __mode = "k" }); -- stanza -> adopted id
	module:hook("muc-occupant-groupchat", function(event)
		local stanza = event.stanza;
		local duplicate, stanza_id;
		-- Every message of a room here may have to go through a mirror: one past the limits is
		-- refused, whoever sent it, rather than shown to some occupants only.
		local text, why = bounded_text(stanza);
		if not text then refuse(event.origin, stanza, why); return true; end
		if master:routes_via_mirror(stanza.attr.from or "") then
			duplicate, stanza_id = call_for(stanza, master, "handle_groupchat", time_now(), text);
			-- The mirror's acknowledgement of the message.
			drain_master();
		end
		-- A proposal is for the master, whoever sent it: no occupant sees it.
		stanza:remove_children("stanza-id", "urn:xmpp:dmuc:0");
		if duplicate then return true; end
		if stanza_id then adopt_for[stanza] = stanza_id; end
		-- The mirror's own elements (its de-duplication key) are for the master only.
		stanza:remove_children(nil, "urn:xmpp:dmuc:0");
	end, 100);
	module:hook("muc-add-history", function(event)
		local key = adopt_for[event.stanza];
		adopting = key and { node = jid_split(event.room.jid), id = event.stanza.attr.id, key = key } or nil;
	end, 1);
	module:hook("muc-add-history", function(event)
		local a = adopting;
		adopting = nil;
		if not a then return end
		adopt_for[event.stanza] = nil;
		local got;
		for tag in event.stanza:childtags("stanza-id", "urn:xmpp:sid:0") do
			if tag.attr.by == event.room.jid then got = tag.attr.id; end
		end
		if got ~= a.key then
			-- The room does not archive this message (mod_muc_mam absent, archiving off), or
			-- the driver chose its own key: the mirror's users have an id no one else has.
			module:log("debug", "stanza-id %s not adopted in %s (archive gave %s)", a.key, event.room.jid, tostring(got));
		end
	end, -0.5);

	local function snapshot(room, mirror, nick)
		local occupants = {};
		for _, occupant in room:each_occupant() do
			local pres = st.clone(occupant:get_presence());
			pres.attr.from = occupant.nick;
			local x = st.stanza("x", { xmlns = "http://jabber.org/protocol/muc#user" });
			room:build_item_list(occupant, x, false);
			pres:add_child(x);
			table.insert(occupants, tostring(pres));
		end
		call(master, "handle_snapshot", time_now(), room.jid, mirror, nick, config_form(room), occupants);
	end

	-- Joins, leaves and status changes of users behind a mirror. This runs before the room's own
	-- access checks (bans, members-only, passwords), so that their refusals, too, are routed back
	-- through the mirror; the sync waits until those checks have passed.
	local function on_presence(event)
		local stanza = event.stanza;
		local occupant = event.occupant or event.dest_occupant;
		local granted = occupant and jid_resource(occupant.nick);
		local text, why = bounded_text(stanza);
		if not text then refuse(event.origin, stanza, why); return true; end
		local verdict, mirror, sync = call_for(stanza, master, "handle_presence", time_now(), text, granted);
		if verdict == nil then
			bounce(event.origin, stanza, "Malformed presence");
			return true;
		end
		-- The marker is for the master; the room must not show it to occupants. Nor may anyone
		-- pass dmuc's own elements (a forged eviction mark, say) to the mirrors in a presence.
		stanza:remove_children("dmuc", DMUC_FEATURE);
		stanza:remove_children(nil, "urn:xmpp:dmuc:0");
		if verdict == "join" and sync then event.dmuc_sync = mirror; end
		drain_master();
		if verdict == "refused" then return true; end
	end
	module:hook("muc-occupant-pre-join", on_presence, 100);
	module:hook("muc-occupant-pre-change", on_presence, 100);
	module:hook("muc-occupant-pre-leave", on_presence, 100);
	module:hook("muc-occupant-pre-join", function(event)
		if event.dmuc_sync then
			snapshot(event.room, event.dmuc_sync, jid_resource(event.occupant.nick));
			drain_master();
		end
	end, -100);

	module:hook("muc-occupant-left", function(event)
		local real = event.stanza and event.stanza.attr.from;
		if real then master:handle_left(event.room.jid, real); end
		for session in event.occupant:each_session() do
			master:handle_left(event.room.jid, session);
		end
	end);

	-- History requests from mirrors, and the mirrors' answers to our sync IQs.
	local function on_iq(event)
		local stanza = event.stanza;
		if stanza.attr.type == "set" then return end
		if stanza.attr.type == "get" and not (stanza:get_child("room", "urn:xmpp:dmuc:0")
			or stanza:get_child("roster", "urn:xmpp:dmuc:0")) then return end
		local text, why = bounded_text(stanza);
		if not text then refuse(event.origin, stanza, why); return true; end
		local verdict, request, snap_room, snap_mirror = call_for(stanza, master, "handle_iq", time_now(), text);
		if verdict == nil then
			bounce(event.origin, stanza, "Malformed request");
			return true;
		end
		if verdict == "history" then
			local room = mod_muc.get_room_from_jid(request.room);
			local messages = {};
			for _, entry in ipairs(room and room._history or {}) do
				table.insert(messages, tostring(entry.stanza));
			end
			local subject;
			if room then
				local from, text = room:get_subject();
				local msg = st.message({ from = from; type = "groupchat" }):tag("subject"):text(text or ""):up();
				-- As the room sends it to a joiner: with the time it was set. The marker tells
				-- the mirror that this room stamps the subject (it does so for later changes).
				local time = room._data and room._data.subject_time;
				if time then
					msg:tag("delay", { xmlns = "urn:xmpp:delay", from = room.jid,
						stamp = require "util.datetime".datetime(time) }):up();
				end
				msg:tag("subject-stamped", { xmlns = "urn:xmpp:dmuc:0" }):up();
				subject = tostring(msg);
			end
			call(master, "handle_history", time_now(), request, messages, subject);
		elseif verdict == "snapshot" then
			-- A mirror back from an outage asks for the roster.
			local room = mod_muc.get_room_from_jid(snap_room);
			if room then snapshot(room, snap_mirror, ""); end
		end
		drain_master();
		if verdict ~= "pass" then return true; end
	end
	module:hook("iq/full", on_iq, 10);
	module:hook("iq/bare", on_iq, 10);

	-- One broadcast = one copy per mirror: bracket the room methods that fan out.
	local wrapped = {};
	for _, name in ipairs({ "broadcast", "publicise_occupant_status" }) do
		local original = room_mt[name];
		wrapped[name] = original;
		room_mt[name] = function(room, ...)
			master:begin_broadcast(room.jid);
			local result = table.pack(pcall(original, room, ...));
			master:end_broadcast(room.jid);
			drain_master();
			if not result[1] then error(result[2], 0); end
			return table.unpack(result, 2, result.n);
		end
	end
	function module.unload()
		for name, original in pairs(wrapped) do room_mt[name] = original; end
		if archive_methods and archive_methods.append == adopting_append then
			archive_methods.append = original_append;
		end
	end

	-- Everything the MUC sends towards other servers passes here.
	module:hook("route/remote", function(event)
		local stanza = event.stanza;
		if not master:routes_via_mirror(stanza.attr.to or "") then return end
		-- The room's own output: what came in was bounded, so this is only a backstop. The
		-- mirror could not take it either; it is dropped, with a warning.
		local text, why = bounded_text(stanza);
		if not text then
			module:log("warn", "dmuc dropped a %s from %s to %s: %s", stanza.name, tostring(stanza.attr.from), tostring(stanza.attr.to), why);
			return true;
		end
		local verdict, replacement = call(master, "handle_outbound", time_now(), text);
		-- What the engine queued meanwhile (an announcement it held) goes first. Only stanzas:
		-- this may run inside a broadcast, where the room must not be acted on.
		drain(master);
		if verdict == "drop" then return true; end
		if verdict == "replace" then
			local s = to_stanza(replacement);
			if s then module:send(s); end
			return true;
		end
	end, 10);

	-- Link loss comes from the mirrors' pings, or from a probe after an s2s session closed
	-- (above) that goes unanswered: a session that one side closes for being idle is no lost link.

	module:log("info", "dmuc master: trusted mirrors %s", table.concat(trusted, ", "));

elseif host_type == "component" and component_module == "dmuc" then
	---------------------------------------------------------------- mirror
	local masters = module:get_option("dmuc_masters", {});
	local ok, mirror = pcall(native.mirror, {
		log = engine_log;
		service = module.host;
		masters = masters;
		queue_limit = module:get_option("dmuc_queue_limit");
		join_timeout = module:get_option("dmuc_join_timeout");
		history_size = module:get_option("dmuc_history_size");
		ping_interval = module:get_option("dmuc_ping_interval");
		ping_timeout = module:get_option("dmuc_ping_timeout");
		catch_up_margin = module:get_option("dmuc_catch_up_margin");
		max_local_occupants = module:get_option("dmuc_max_local_occupants");
		max_rooms = module:get_option("dmuc_max_rooms");
		store_after = module:get_option("dmuc_store_after");
		max_stanza_depth = max_depth;
		max_stanza_size = max_size;
	});
	if not ok then error("mod_dmuc: " .. tostring(mirror)); end

	module:add_feature(DMUC_FEATURE);

	-- The outbound queue outlives a restart: one stored entry per item, under the key "q<seq>"
	-- of a keyval store (every storage driver has keyval, and lists its keys with users()).
	-- A message costs one write and one delete if the master has not acknowledged it within
	-- dmuc_store_after (the engine holds it back until then), nothing if it has. (A "map" store
	-- would be the natural fit, but on the internal driver it rewrites one file of all items.)
	local store = module:open_store("dmuc_queue");
	local store_puts, store_deletes, stored = 0, 0, 0;
	local function persist()
		while true do
			local op, key, item = mirror:poll_store();
			if not op then break end
			local ok_set, err;
			if op == "put" then
				ok_set, err = store:set("q" .. string.format("%d", key), { item = item });
				store_puts, stored = store_puts + 1, stored + 1;
			else
				ok_set, err = store:set("q" .. string.format("%d", key), nil);
				store_deletes, stored = store_deletes + 1, stored - 1;
			end
			if not ok_set then
				module:log("error", "cannot %s queue item %d: %s", op, key, tostring(err));
			end
		end
	end

	local measure_up = module:measure("links_up", "amount");
	local measure_queued = module:measure("queued", "amount");
	local measure_in_flight = module:measure("in_flight", "amount");
	status_lines[module.host] = function()
		local lines, up, queued, in_flight = {}, 0, 0, 0;
		for _, s in ipairs(mirror:status()) do
			if s.up then up = up + 1 end
			queued, in_flight = queued + s.queued, in_flight + s.in_flight;
			table.insert(lines, string.format("master %s %s%s, %d room(s), %d queued, %d in flight, last pong %s, last resync %s, %d outage(s)",
				s.master, s.up and "up" or "DOWN", s.down_since and (" since " .. ago(s.down_since)) or "",
				s.rooms, s.queued, s.in_flight, ago(s.last_pong), ago(s.last_resync), s.outages));
		end
		measure_up(up); measure_queued(queued); measure_in_flight(in_flight);
		table.insert(lines, string.format("stored queue %d item(s), %d put(s), %d delete(s) since start",
			stored, store_puts, store_deletes));
		return lines;
	end;

	local schedule = timer_for(mirror, function(now)
		mirror:handle_timeout(now);
		drain(mirror);
		persist();
		status_lines[module.host]();
	end);

	local function run(method, origin, stanza)
		local text, why = bounded_text(stanza);
		if not text then
			refuse(origin, stanza, why);
			return true;
		end
		local consumed = call_for(stanza, mirror, method, time_now(), text);
		if consumed == nil then
			bounce(origin, stanza, "Malformed stanza");
			return true;
		end
		drain(mirror);
		persist();
		schedule();
		return consumed;
	end

	do
		-- Every stored item; the engine puts them back in the order of their keys.
		local items = {};
		if store.users then
			for key in store:users() do
				if key:match("^q%d+$") then
					local saved, err = store:get(key);
					if saved and type(saved.item) == "string" then
						table.insert(items, saved.item);
					elseif err then
						module:log("error", "cannot load queue item %s: %s", key, tostring(err));
					end
				end
			end
		else
			module:log("error", "this storage driver cannot list the stored queue: nothing restored");
		end
		stored = #items;
		-- A store from before per-item storage: one list, in order. The engine gives each item
		-- a key; once they are stored so, the list goes.
		local legacy = store:get("queue");
		local legacy_items = legacy and legacy.items or {};
		for _, item in ipairs(legacy_items) do table.insert(items, item); end
		local imported = true;
		if #items > 0 then
			local n = call(mirror, "import_queue", time_now(), items);
			imported = n ~= nil;
			module:log("info", "restored %s queued message(s) for the masters", tostring(n));
			persist();
		end
		if legacy and imported then
			local ok_set, err = store:set("queue", nil);
			if not ok_set then module:log("error", "cannot drop the old stored queue: %s", tostring(err)); end
		end
		schedule();
	end
	-- The VirtualHost half finds this mirror through a table shared by every host.
	local registry = module:shared("/*/dmuc/mirrors");
	registry[module.host] = {
		handles = function(to) return mirror:handles(to) end;
		handle_local = function(origin, stanza) return run("handle_local", origin, stanza) end;
		-- A local user went unavailable (their presence broadcast): leave their rooms for them.
		handle_unavailable = function(stanza)
			-- A status past the limits is left out: the leave itself is not.
			local text = bounded_text(stanza)
				or tostring(st.presence({ type = "unavailable", from = stanza.attr.from }));
			if (call(mirror, "handle_local_unavailable", time_now(), text) or 0) > 0 then
				drain(mirror);
				persist();
				schedule();
			end
		end;
		handle_remote = function(origin, stanza) return run("handle_remote", origin, stanza) end;
		s2s_closed = function(domain)
			call(mirror, "handle_s2s_closed", time_now(), domain);
			drain(mirror);
			schedule();
		end;
	};
	-- At shutdown, what the engine holds back from the store is stored.
	local function flush_store()
		call(mirror, "flush_store");
		persist();
	end
	module:hook_global("server-stopping", flush_store);
	function module.unload()
		registry[module.host] = nil;
		status_lines[module.host] = nil;
		flush_store();
	end

	-- An s2s session of this component with a master closed. Outgoing: the mirror service's
	-- requests and pings went on it, and one written into it is lost with it (the engine pings
	-- again at once; the users' sessions are the VirtualHost half's). Incoming: the master's
	-- broadcasts came on it, and what it carried may be lost (the rooms catch up).
	local function session_closed(method, remote_of)
		return function(event)
			local remote = event.session and event.session[remote_of];
			if remote and mirror:handles(remote) then
				call(mirror, method, time_now(), remote);
				drain(mirror);
				schedule();
			end
		end
	end
	module:hook("s2sout-destroyed", session_closed("handle_s2s_closed", "to_host"));
	module:hook("s2sin-destroyed", session_closed("handle_s2s_in_closed", "from_host"));

	-- Stanzas from masters to the mirror service and to users' escaped JIDs at it.
	local function from_master(event)
		if run("handle_remote", event.origin, event.stanza) then return true; end
	end
	for _, kind in ipairs({ "presence", "message", "iq" }) do
		module:hook(kind .. "/host", from_master);
		module:hook(kind .. "/bare", from_master);
	end

	module:log("info", "dmuc mirror for %s", table.concat(masters, ", "));

elseif host_type == "local" then
	---------------------------------------------------------------- user host
	local registry = module:shared("/*/dmuc/mirrors");
	local function mirror_for(to)
		if not to then return nil end
		for _, m in pairs(registry) do
			if m.handles(to) then return m end
		end
	end

	-- Local users' stanzas for mirrored rooms go through the mirror: presences to occupant JIDs
	-- (and leaves to the bare room), groupchat messages, self-pings. Priority 0.5: after the
	-- modules that decorate outgoing presence (mod_vcard_legacy's avatar hash, at 1), before
	-- mod_presence routes it (at 0), so the room gets the presence a direct user would send.
	local function outgoing(event)
		local m = mirror_for(event.stanza.attr.to);
		if m and m.handle_local(event.origin, event.stanza) then return true; end
	end
	module:hook("pre-presence/full", outgoing, 0.5);
	module:hook("pre-presence/bare", outgoing, 0.5);
	module:hook("pre-message/bare", outgoing, 0.5);
	module:hook("pre-iq/full", outgoing, 0.5);

	-- A user who goes unavailable leaves the mirrored rooms they are in. mod_presence sends the
	-- broadcast unavailable on to every room it holds a directed presence to (RFC 6121 4.6.3),
	-- but a join the mirror took never reached it, so it holds none: without this the user
	-- stays in the room at the master and at the mirror. The broadcast (an explicit one, or the
	-- one mod_presence makes when the stream closes) comes here first; a session that never sent
	-- presence of its own gets none, so its end is caught at resource-unbind (after
	-- mod_presence: a user already gone has nothing left to leave).
	local function gone(stanza)
		for _, m in pairs(registry) do m.handle_unavailable(stanza); end
	end
	module:hook("pre-presence/bare", function(event)
		local stanza, origin = event.stanza, event.origin;
		if stanza.attr.type == "unavailable" and event.to_self and origin.type == "c2s" then
			gone(stanza);
		end
	end, 0.6);
	module:hook("resource-unbind", function(event)
		local session = event.session;
		if not session.full_jid then return end
		local pres = st.presence({ type = "unavailable", from = session.full_jid });
		if event.error then pres:tag("status"):text("Disconnected: " .. tostring(event.error)):up(); end
		gone(pres);
	end, -1);

	-- A join error the master sent straight to the user ends the mirror's pending join.
	module:hook("presence/full", function(event)
		local stanza = event.stanza;
		if stanza.attr.type ~= "error" or not event.origin or event.origin.type ~= "s2sin" then return end
		local m = mirror_for(stanza.attr.from);
		if m then m.handle_remote(event.origin, stanza); end
	end, 100);

	-- Errors about a user's groupchat messages: the s2s bounce of a message in flight (the
	-- mirror sends it again later, so the user must not see it), or the master saying the user
	-- is not in the room (the mirror rejoins them).
	module:hook("message/full", function(event)
		local stanza = event.stanza;
		if stanza.attr.type ~= "error" then return end
		local m = mirror_for(stanza.attr.from);
		if m and m.handle_remote(event.origin, stanza) then return true; end
	end, 100);

	-- Answers to the mirror's pings, sent from this host so that they share its users' s2s stream.
	module:hook("iq/host", function(event)
		local stanza = event.stanza;
		if stanza.attr.type ~= "result" and stanza.attr.type ~= "error" then return end
		local m = mirror_for(stanza.attr.from);
		if m and m.handle_remote(event.origin, stanza) then return true; end
	end, 100);

	-- A closed s2s session may have taken stanzas with it: the mirror pings at once.
	local function s2s_closed(event)
		local session = event.session;
		local remote = session and (session.direction == "outgoing" and session.to_host or session.from_host);
		local m = remote and mirror_for(remote);
		if m then m.s2s_closed(remote); end
	end
	module:hook("s2sout-destroyed", s2s_closed);
	module:hook("s2sin-destroyed", s2s_closed);
else
	error("mod_dmuc: load it on a MUC component (master), as Component \"...\" \"dmuc\" (mirror), or on a VirtualHost");
end
