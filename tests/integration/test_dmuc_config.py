"""A bad option value stops mod_dmuc from loading, with a message that names the option; the
server itself keeps running."""

import os

import pytest

from servers import CONFERENCE, Prosody
from test_dmuc_flow import DIST


@pytest.mark.parametrize("block, message", [
    (f'Component "{CONFERENCE}" "muc"\n    modules_enabled = {{ "dmuc" }}\n    dmuc_trusted_mirrors = {{ 42 }}',
     r"dmuc_trusted_mirrors.*expected a list of domain names"),
    (f'Component "{CONFERENCE}" "muc"\n    modules_enabled = {{ "dmuc" }}\n    dmuc_trusted_mirrors = {{ "user@host" }}',
     r"dmuc_trusted_mirrors.*'user@host' is not a domain name"),
    ('Component "mirror.bad.localhost" "dmuc"',
     r"dmuc_masters.*list at least one MUC service"),
    ('Component "mirror.bad.localhost" "dmuc"\n    dmuc_masters = { "conference.x.localhost" }\n    dmuc_queue_limit = -3',
     r"dmuc_queue_limit.*positive whole number"),
    ('Component "mirror.bad.localhost" "dmuc"\n    dmuc_masters = { "conference.x.localhost" }\n    dmuc_ping_timeout = "soon"',
     r"dmuc_ping_timeout.*positive whole number"),
    (f'Component "{CONFERENCE}" "muc"\n    modules_enabled = {{ "dmuc" }}\n    dmuc_link_timeout = 0',
     r"dmuc_link_timeout.*positive whole number"),
    ('Component "mirror.bad.localhost" "dmuc"\n    dmuc_masters = { "conference.x.localhost" }\n    dmuc_store_after = -1',
     r"dmuc_store_after.*number of seconds, 0 or more"),
])
def test_bad_option_stops_the_module(block, message):
    server = Prosody("bad.localhost", extra_blocks=[block], plugin_paths=[os.path.abspath(DIST)])
    try:
        server.start()
        server.wait_for_log(r"Error initializing module 'dmuc'.*" + message, timeout=15)
        assert server.running
    finally:
        server.cleanup()
