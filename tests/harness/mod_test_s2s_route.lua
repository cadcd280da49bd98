-- mod_test_s2s_route: send outgoing s2s connections for chosen domains to a fixed ip:port.
--
-- Test-only. Prosody has no option mapping a remote domain to host:port: mod_s2s asks
-- net.resolvers.service for the _xmpp-server._tcp SRV record and falls back to port 5269.
-- On this machine libunbound answers every *.localhost with 127.0.0.1 and the SRV lookup
-- fails, so every server would dial 127.0.0.1:5269. The test harness instead routes each
-- peer domain to a counting TCP proxy in front of the other server.
--
-- Config (global section):
--   modules_enabled = { ...; "test_s2s_route" }
--   test_s2s_routes = {
--       ["raleigh.localhost"] = "127.0.0.1:40001";    -- exactly this domain
--       ["*.raleigh.localhost"] = "127.0.0.1:40001";  -- any subdomain (conference., mirror., ...)
--   }
--
-- mod_s2s captured the net.resolvers.service *table* at load time and looks up `.new` on every
-- outgoing connection, so replacing the field affects all hosts and components in the process.
-- The module is global (one instance), so the wrapper is installed once and removed on unload.

module:set_global();

local service = require "net.resolvers.service";
local basic = require "net.resolvers.basic";

local routes = {};      -- exact domain -> { ip, port }
local wildcards = {};   -- parent domain -> { ip, port } (from "*.parent" keys)

for domain, target in pairs(module:get_option("test_s2s_routes", {})) do
	local ip, port = tostring(target):match("^%[?([^%]]+)%]?:(%d+)$");
	assert(ip and port, "test_s2s_routes: bad target for " .. tostring(domain) .. ": " .. tostring(target));
	local entry = { ip, tonumber(port) };
	local parent = domain:match("^%*%.(.+)$");
	if parent then
		wildcards[parent] = entry;
	else
		routes[domain] = entry;
	end
end

local function lookup(hostname)
	if routes[hostname] then return routes[hostname]; end
	-- Walk up the labels: a.b.c -> b.c -> c, so "*.b.c" matches a.b.c and x.a.b.c.
	local parent = hostname:match("^[^.]+%.(.+)$");
	while parent do
		if wildcards[parent] then return wildcards[parent]; end
		parent = parent:match("^[^.]+%.(.+)$");
	end
	return nil;
end

local original_new = service.new;

service.new = function (hostname, service_name, conn_type, extra)
	-- Only plain s2s is redirected; direct-TLS ("xmpps-server") is not used by the tests and must
	-- not be pointed at a plain-text port.
	local target = service_name == "xmpp-server" and lookup(hostname);
	if target then
		module:log("debug", "s2s route override: %s -> %s:%d", hostname, target[1], target[2]);
		return basic.new(target[1], target[2], conn_type, extra);
	end
	return original_new(hostname, service_name, conn_type, extra);
end

function module.unload()
	service.new = original_new;
end

module:log("info", "s2s route overrides active for %d domain(s) and %d wildcard(s)",
	(function () local n = 0; for _ in pairs(routes) do n = n + 1; end return n; end)(),
	(function () local n = 0; for _ in pairs(wildcards) do n = n + 1; end return n; end)());
