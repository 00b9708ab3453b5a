"""End to end in real headless Chromium (Debian's ``chromium``, driven by Playwright; never a
downloaded browser): two real agents serve the dashboard; the test sees the leader, logs in,
clicks "Run now" and watches the run appear and finish without a reload. It saves a screenshot
of each main page under test-output/dashboard/ for a reviewer.

Chromium is installed with apt-get when missing and running as root; otherwise the test skips
locally and fails under CI=true.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cronsul_testing import REPO, Cluster, RedisServer, require_binary, unavailable, wait_until

from devconsul.testing import DevConsul

SHOTS = REPO / "test-output" / "dashboard"
TOKEN = "browser-test-admin-token-0123456789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
JOBS = {
    "hello": {"schedule": "@every 1h",
              "command": ["/bin/sh", "-c", "echo \"hello from $CRONSUL_NODE <b>not bold</b>\"; "
                          "sleep 1; echo done"]},
    "tick": {"schedule": "*/2 * * * * *", "command": ["/bin/sh", "-c", "echo tick"]},
    "flaky": {"schedule": "*/3 * * * * *", "timezone": "America/New_York",
              "command": ["/bin/sh", "-c", "echo failing; exit 3"]},
}


def chromium() -> str:
    """The system Chromium, installed from Debian when missing and we are root."""
    return require_binary("chromium", "chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def cluster(tmp_path: Path, redis_proc: RedisServer, redis_client: redis.Redis,
            devconsul: DevConsul) -> Iterator[tuple[Cluster, dict[str, str]]]:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    c = Cluster(tmp_path, devconsul, redis_proc.url, ["a1", "a2"], JOBS)
    for agent in c.agents.values():  # [http] appended: a table after the [jobs.*] ones
        with agent.config.open("a") as f:
            f.write(f'\n[http]\nlisten = "127.0.0.1:0"\nadmin_token_file = "{token}"\n')
    c.start()
    try:
        c.wait_leader(20)

        def urls() -> dict[str, str] | None:
            found = {}
            for node in c.agents:
                raw: Any = redis_client.get(f"cronsul:dash:node:{node}")
                if raw and json.loads(raw).get("url"):
                    found[node] = json.loads(raw)["url"].rstrip("/")
            return found if len(found) == len(c.agents) else None

        yield c, wait_until(urls, 20, what="both dashboards published")
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.mark.slow
def test_dashboard_live_in_chromium(browser: Any, cluster: tuple[Cluster, dict[str, str]],
                                    redis_client: redis.Redis) -> None:
    c, urls = cluster
    leader = c.wait_leader(5)
    follower = next(n for n in urls if n != leader)
    base = urls[follower]  # any node serves the same cluster view
    redis_client.xadd("cronsul:dlq", {"reason": "malformed", "error": "malformed: not JSON",
                                      "queue": "default", "entry_id": "1-0", "node": leader,
                                      "payload": "<not json>"})
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(base + "/")
    page.wait_for_selector("#leader strong")
    assert page.inner_text("#leader strong") == leader
    page.wait_for_selector('tr[data-node="a1"]')
    page.wait_for_selector('tr[data-node="a2"]')
    assert "read-only" not in page.content()
    # Let the scheduled jobs fill the strips, then wait for a poll to show the elections.
    page.wait_for_selector(".elections tbody td:has-text('%s')" % leader, timeout=10_000)
    shot(page, "cluster")

    page.goto(base + "/login?next=/jobs/hello")
    shot(page, "login")
    page.fill("input[name=token]", TOKEN)
    page.fill("input[name=name]", "browser-test")
    page.click("form.login button")
    page.wait_for_url("**/jobs/hello")
    assert "admin: browser-test" in page.inner_text("header")

    page.evaluate("window.__noReload = 'still here'")
    page.click("form.run-now button")
    row = page.wait_for_selector('tr[data-run^="hello@manual-"]', timeout=10_000)
    assert row is not None
    run_id = row.get_attribute("data-run")
    page.wait_for_selector(f'tr[data-run="{run_id}"] .badge.st-succeeded', timeout=20_000)
    assert page.evaluate("window.__noReload") == "still here"  # updated live, never reloaded
    assert "enqueued " + str(run_id) in page.inner_text("#flash")
    shot(page, "job")

    page.click(f'tr[data-run="{run_id}"] a.run')
    page.wait_for_selector("#output")
    output = page.inner_text("#output")
    assert "<b>not bold</b>" in output and "done" in output  # shown as text, escaped
    assert page.query_selector("#output b") is None
    shot(page, "run")

    page.goto(base + "/jobs")
    page.wait_for_selector('tr[data-job="tick"] .cell.st-succeeded', timeout=10_000)
    page.wait_for_selector('tr[data-job="flaky"] .cell.st-failed', timeout=10_000)
    shot(page, "jobs")

    page.goto(base + "/queues")
    page.wait_for_selector('tr[data-queue="default"]')
    page.wait_for_selector("table.dlq td:has-text('malformed')")
    shot(page, "queues")
    assert not errors, errors
    context.close()
