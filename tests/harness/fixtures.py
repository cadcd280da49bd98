"""pytest fixtures and hooks for the two-server tests (imported by tests/integration/conftest.py).

Fixtures:
  make_two_servers(**kwargs) -> TwoServers   factory; kwargs as servers.two_servers(); may be
                                             called more than once; everything is torn down
                                             after the test.
  two_servers_env -> TwoServers              make_two_servers() with defaults (plain MUC).

On a failing test, the servers' debug logs (tail), the link counters and the temp dir paths are
attached to the report as a section, and the temp dirs are kept for inspection.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import pytest

import servers

# Lines of each server's log attached to a failure report (DMUC_LOG_LINES overrides).
LOG_LINES = int(os.environ.get("DMUC_LOG_LINES", "300"))


@pytest.fixture
def make_two_servers(request):
    envs = []
    request.node._dmuc_envs = envs
    with ExitStack() as stack:
        def make(**kwargs) -> servers.TwoServers:
            env = stack.enter_context(servers.two_servers(**kwargs))
            envs.append(env)
            return env
        yield make


@pytest.fixture
def two_servers_env(make_two_servers) -> servers.TwoServers:
    return make_two_servers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    envs = getattr(item, "_dmuc_envs", None)
    if not envs or not report.failed or report.when == "teardown":
        return
    # The call phase report is made before fixture teardown: logs still exist here.
    for i, env in enumerate(envs):
        env.keep = True
        dirs = ", ".join(s.dir for s in env.servers)
        report.sections.append((f"dmuc servers #{i} (kept: {dirs})", env.logs(LOG_LINES)))
