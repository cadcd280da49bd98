"""Integration tests: real Prosody servers on loopback (see tests/harness/).

Puts tests/harness on sys.path, so tests import `servers`, `clients` directly, and registers
the harness fixtures (make_two_servers, two_servers_env) and the failure-report hook.
"""

import os
import sys

HARNESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness")
if HARNESS not in sys.path:
    sys.path.insert(0, HARNESS)

from fixtures import make_two_servers, two_servers_env, pytest_runtest_makereport  # noqa: E402,F401
from ejabberd import make_mixed_servers  # noqa: E402,F401
