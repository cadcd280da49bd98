-- mod_test_inject: an attacker's server for tests. A local user asks it to write a raw stanza
-- onto its own outgoing s2s stream, as is: any `from`, any nesting, any size. Test-only: never
-- load it on a real server.
--
-- Load it on the attacker's VirtualHost (modules_enabled = { "test_inject" }). A local user
-- sends, to that host:
--
--   <iq type='set' to='evil.localhost' id='x'>
--     <inject xmlns='urn:dmuc:test:inject' to-host='conference.fairfax.localhost'
--             depth='100000' pad='0' barrier='1'>RAW XML, as text</inject>
--   </iq>
--
-- The module takes (or opens, with a ping, and waits up to 20 s for dialback) the stream from
-- this host to `to-host` and writes the text on it byte for byte, with `{{BOMB}}` replaced by
-- `depth` nested <a/> elements and `{{PAD}}` by `pad` bytes of text (so the client's own c2s
-- stream carries no bomb). With `barrier`, it then writes a ping to `to-host` on the same
-- stream and waits for the answer: the receiving server handled the raw stanza before it.
-- The answer: <injected xmlns='urn:dmuc:test:inject' outcome='...'/> with outcome
--   pong    the barrier ping was answered (the stream is still open)
--   closed  the receiving server closed the stream (e.g. a forged `from`: RFC 6120 4.9.3.9)
--   sent    written, no barrier asked
-- or an error: remote-server-timeout (no stream within 20 s, or the barrier unanswered).

local st = require "util.stanza";
local new_id = require "util.id".short;

local NS = "urn:dmuc:test:inject";
local hosts = prosody.hosts;
local pongs = {};     -- barrier id -> true once answered

local function nest(levels)
	if levels < 1 then return ""; end
	return "<a xmlns='urn:example:bomb'>" .. ("<a>"):rep(levels - 1) .. ("</a>"):rep(levels);
end

local function authed(to_host)
	local s = hosts[module.host].s2sout[to_host];
	if s and s.type == "s2sout" and not s.destroyed then return s; end
end

-- Answers to our barrier pings (results and errors alike), before anything else sees them.
module:hook("iq/host", function (event)
	local id = event.stanza.attr.id;
	local t = event.stanza.attr.type;
	if id and pongs[id] == false and (t == "result" or t == "error") then
		pongs[id] = true;
		return true;
	end
end, 10000);

module:hook("iq-set/host/" .. NS .. ":inject", function (event)
	local origin, stanza = event.origin, event.stanza;
	if origin.type ~= "c2s" or origin.host ~= module.host then
		origin.send(st.error_reply(stanza, "auth", "forbidden"));
		return true;
	end
	local req = stanza.tags[1];
	local to_host = req.attr["to-host"];
	local raw = req:get_text() or "";
	local depth = tonumber(req.attr.depth) or 0;
	local pad = tonumber(req.attr.pad) or 0;
	local barrier = req.attr.barrier == "1";
	if not to_host or raw == "" then
		origin.send(st.error_reply(stanza, "modify", "bad-request", "to-host and a raw stanza"));
		return true;
	end
	raw = raw:gsub("{{BOMB}}", function () return nest(depth); end)
		:gsub("{{PAD}}", function () return ("x"):rep(pad); end);

	local deadline = os.time() + 20;
	local session, ping_id;
	local function answer(outcome)
		origin.send(st.reply(stanza):tag("injected", { xmlns = NS, outcome = outcome }));
	end
	local function fail(text)
		origin.send(st.error_reply(stanza, "wait", "remote-server-timeout", text));
	end
	local function step()
		if ping_id then
			if pongs[ping_id] then pongs[ping_id] = nil; answer("pong"); return; end
			if session.destroyed or hosts[module.host].s2sout[to_host] ~= session then
				pongs[ping_id] = nil; answer("closed"); return;
			end
			if os.time() > deadline then pongs[ping_id] = nil; fail("barrier unanswered"); return; end
			return 0.02;
		end
		session = authed(to_host);
		if not session then
			if os.time() > deadline then fail("no authenticated stream to " .. to_host); return; end
			return 0.02;
		end
		module:log("info", "injecting %d bytes to %s", #raw, to_host);
		session.sends2s(raw);
		if not barrier then answer("sent"); return; end
		ping_id = "inject-barrier-" .. new_id();
		pongs[ping_id] = false;
		session.sends2s(st.iq({ type = "get", from = module.host, to = to_host, id = ping_id })
			:tag("ping", { xmlns = "urn:xmpp:ping" }));
		deadline = os.time() + 20;
		return 0.02;
	end
	if not authed(to_host) then
		-- Opens the stream (dialback) like any stanza to a new domain; its answer is ignored.
		local open_id = "inject-open-" .. new_id();
		pongs[open_id] = false;
		module:send(st.iq({ type = "get", from = module.host, to = to_host, id = open_id })
			:tag("ping", { xmlns = "urn:xmpp:ping" }));
	end
	local again = step();
	if again then module:add_timer(again, step); end
	return true;
end);
