"""The dashboard of a running daemon in a real browser: Debian's chromium, headless, driven by
selenium through /usr/bin/chromedriver.  One browser for the module, and a daemon per test (the
second with settings.http.auth: all, the last with settings.fleet on a throw-away PostgreSQL);
screenshots of each page go to the test's tmp dir.  Skipped when chromium or its driver is not
installed (tests/setup-system.sh installs both)."""

import os
import re
import shutil
import tempfile

import pytest

pytest.importorskip("prometheus_client")
selenium = pytest.importorskip("selenium")

from daemon_harness import wait_for  # noqa: E402
from web_harness import TOKEN, WebDaemon  # noqa: E402

pytestmark = [pytest.mark.process, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
    pytest.skip("chromium and chromium-driver are not installed (tests/setup-system.sh installs them)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

BODY = """tasks:
  - name: good
    schedule: "* * * * * *"
    command: "echo all fine"
  - name: bad
    schedule: "*/2 * * * * *"
    command: "echo oops; exit 3"
  - name: manual
    schedule: "0 0 3 * * *"
    command: "echo by hand"
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless chromium for the module's tests."""
    directory = tmp_path_factory.mktemp("chromium")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=directory)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--no-first-run",
                 "--metrics-recording-only", "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory, browser):
    directory = tmp_path_factory.mktemp("browser")
    daemon = WebDaemon(directory, BODY, base_path="/cron/").start()
    browser.shots = directory
    try:
        yield daemon, browser
    finally:
        daemon.kill()


def until(driver, check, timeout=15, what="the page"):
    """Poll ``check(driver)`` until it is truthy (exceptions count as not yet)."""
    def attempt():
        try:
            return check(driver)
        except Exception:
            return None
    try:
        return wait_for(attempt, timeout, what)
    except AssertionError:
        shot(driver, "failed")
        raise


def shot(driver, name):
    driver.save_screenshot(os.path.join(driver.shots, f"{name}.png"))


def state_of(driver, name):
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-task="{name}"] .state-cell').text


def test_dashboard(site):
    daemon, driver = site
    if "browser" in driver.log_types:
        driver.get_log("browser")           # what the tests before logged (another test's 401s)
    wait_for(lambda: any(r["ended"] for r in daemon.runs("bad")), 15, "a run of bad to end")
    driver.get(daemon.base)
    until(driver, lambda d: state_of(d, "bad") == "failing", what="bad shown as failing")
    assert state_of(driver, "good") == "ok" and state_of(driver, "manual") == "never ran"
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-task="manual"]').text
    assert "At 03:00" in row             # the schedule in plain English
    shot(driver, "tasks")

    search = driver.find_element(By.ID, "search")
    search.send_keys("goo")
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-task]")) == 1, what="search")
    search.clear()

    driver.get(daemon.base + "#/task/bad")
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-strip .run.r-failure"),
          what="bad's runs in the strip")
    until(driver, lambda d: "oops" in d.find_element(By.ID, "log").text, what="bad's log")
    assert driver.find_elements(By.CSS_SELECTOR, "#duration-chart rect")
    shot(driver, "task-bad")

    driver.get(daemon.base + "#/task/manual")
    until(driver, lambda d: d.find_element(By.ID, "run-now"), what="the run-now button")
    driver.execute_script("sessionStorage.setItem('torchcore-token', arguments[0])", TOKEN)
    driver.find_element(By.ID, "run-now").click()
    text = until(driver, lambda d: d.find_element(By.CSS_SELECTOR, "[role=status]").text, what="a reply")
    assert text.startswith("started run "), text
    run_id = text.split()[-1]
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'#runs-strip .run[data-run="{run_id}"]'),
          timeout=20, what="the manual run in the strip")
    shot(driver, "task-manual")

    driver.get(daemon.base + "#/task/good")     # the log, followed live
    until(driver, lambda d: "all fine" in d.find_element(By.ID, "log").text, what="good's log")
    driver.find_element(By.ID, "follow").click()
    seen = until(driver, lambda d: d.find_element(By.ID, "log").text.count("all fine"), what="a follow")
    until(driver, lambda d: d.find_element(By.ID, "log").text.count("all fine") >= seen + 2,
          what="new lines arriving in the followed log")
    shot(driver, "task-good-follow")

    for name in ("good", "bad"):        # stop the stream of runs, so the count holds still
        assert daemon.json(f"api/v1/tasks/{name}/disable", "POST", token=TOKEN)[0] == 200
    wait_for(lambda: all(r["ended"] or r["skipped"] or r["missed"] for r in daemon.runs()), 15,
             "every run to end")
    runs = daemon.runs()
    driver.get(daemon.base + "#/timeline")
    bars = until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#timeline rect.bar"), what="bars")
    assert sorted(int(b.get_attribute("data-run")) for b in bars) == sorted(r["run_id"] for r in runs)
    assert driver.find_elements(By.CSS_SELECTOR, "#timeline rect.bar.r-failure")
    shot(driver, "timeline")

    driver.get(daemon.base + "#/history")
    driver.find_element(By.ID, "h-failed").click()
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    until(driver, lambda d: {r.text.split()[1] for r in d.find_elements(By.CSS_SELECTOR, "#history tbody tr")}
          == {"bad"}, what="only bad's failed runs")
    shot(driver, "history")
    if "browser" in driver.log_types:
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_dashboard_under_auth_all(tmp_path, browser):
    """settings.http.auth: all: the page asks for the token once, sends it as a header on every
    request, and the live log follow (fetch() reading the stream) works with it."""
    driver = browser
    driver.shots = str(tmp_path)
    daemon = WebDaemon(tmp_path, BODY.split("  - name: bad")[0], auth="all").start()
    try:
        assert daemon.request("api/v1/status")[0] == 401
        driver.get(daemon.base + "#/task/good")
        box = until(driver, lambda d: d.find_element(By.ID, "token-input"), what="the token form")
        shot(driver, "auth-token-form")
        box.send_keys("wrong-token-0123456789")
        driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        box = until(driver, lambda d: [e for e in d.find_elements(By.ID, "token-input") if e != box][0],
                    what="the form again, for a wrong token")
        assert "That token was refused" in driver.find_element(By.ID, "main").text
        box.send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        until(driver, lambda d: "all fine" in d.find_element(By.ID, "log").text, what="good's log")
        driver.find_element(By.ID, "follow").click()
        seen = until(driver, lambda d: d.find_element(By.ID, "log").text.count("all fine"),
                     what="a follow")
        until(driver, lambda d: d.find_element(By.ID, "log").text.count("all fine") >= seen + 2,
              what="new lines arriving in the followed log")
        shot(driver, "auth-follow")
        driver.get(daemon.base + "#/")      # kept for the tab: no second question
        until(driver, lambda d: state_of(d, "good") == "ok", what="the task list")
        assert not driver.find_elements(By.ID, "token-input")
        assert TOKEN not in driver.current_url and TOKEN not in daemon.log
    finally:
        daemon.kill()


def test_the_fleet_view_without_the_fleet_says_how_to_set_it_up(site):
    daemon, driver = site
    if "browser" in driver.log_types:
        driver.get_log("browser")           # what the tests before logged
    driver.get(daemon.base + "#/fleet")
    text = until(driver, lambda d: d.find_element(By.ID, "fleet-not-set-up").text, what="the page")
    assert "The fleet is not set up" in text and "torchcore fleet init" in text
    assert "database: postgresql://" in text
    shot(driver, "fleet-not-set-up")
    driver.get(daemon.base + "#/task/bad")
    until(driver, lambda d: "The fleet is not set up" in d.find_element(By.ID, "task-fleet").text,
          what="the task page's fleet part")
    if "browser" in driver.log_types:       # no request bound to fail (a 404) was sent
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_a_link_to_a_task_whose_name_is_not_utf8_says_so(site):
    """#/task/%E0 (a broken link, a name cut mid-character): the task page says there is no
    such task, instead of the page staying at Loading... (decodeURIComponent throws)."""
    daemon, driver = site
    driver.get(daemon.base + "#/task/%E0%A4")
    text = until(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#main .message.error").text,
                 what="the task page's error")
    assert "404" in text, text
    driver.get(daemon.base + "#/")
    until(driver, lambda d: state_of(d, "bad"), what="the task list after it")


FLEET_BODY = """tasks:
  - name: backup
    schedule: "0 0 3 * * *"
    command: "echo backup"
"""


def cells(driver, table):
    """{data-node: {class: (text, classes)}} of a table's rows, read at one moment (the page
    redraws its tables every few seconds: elements found one by one may be gone by the next)."""
    return driver.execute_script("""
        const out = {};
        for (const tr of document.querySelectorAll(arguments[0] + ' tbody tr[data-node]')) {
          const row = out[tr.dataset.node] = {};
          for (const td of tr.querySelectorAll('td')) for (const name of td.classList)
            row[name] = [td.innerText, td.className];
        }
        return out;""", table)


def test_the_fleet_view(tmp_path, browser, pg):
    """Three nodes in the fleet database (one down, one drifted with its clock off), their runs:
    the Fleet view shows each node's state, drift, clock and counts, the fleet history filtered
    by node and failed, a run's stored output; the task's page which nodes ran it, how it went."""
    import fleetrows

    from torchcore import config

    driver = browser
    driver.shots = str(tmp_path)
    conn = fleetrows.init(pg.url)
    daemon = WebDaemon(tmp_path, FLEET_BODY, settings=f"  fleet:\n    database: {pg.url}\n")
    digest = config.load(daemon.path).digest      # the file this daemon runs: the fleet's own
    fleetrows.add_node(conn, "web-1", digest=digest, file_age=600, clock_offset=0.004, running=1,
                       heartbeat=60, addresses=("10.0.0.1",))
    fleetrows.add_node(conn, "web-2", digest="0ld" * 8, file_age=7200, clock_offset=2.5,
                       heartbeat=60, addresses=("10.0.0.2",))
    fleetrows.add_node(conn, "web-3", digest=digest, age=900, heartbeat=60, addresses=("10.0.0.3",))
    fleetrows.add_run(conn, "web-1", 11, "backup", age=600, output="backup done\n")
    fleetrows.add_run(conn, "web-2", 21, "backup", age=500, exit_code=2, output="disk full\n")
    fleetrows.add_run(conn, "web-3", 31, "backup", age=4000, output="backup done\n")
    try:
        daemon.start()
        driver.get(daemon.base + "#/fleet")

        shown = until(driver, lambda d: (lambda n: n["web-3"]["node-state"][0].startswith("down") and n)(
            cells(d, "#fleet-nodes-table")), what="web-3 down")
        assert shown["web-1"]["node-state"][0].startswith("up")
        assert shown["web-2"]["node-state"][0].startswith("up")
        assert re.search(r"drifted for 1[01]m", shown["web-2"]["node-file"][0])
        assert "drifted" not in shown["web-1"]["node-file"][0]
        assert shown["web-1"]["node-file"][0].startswith(digest[:12])
        text, classes = shown["web-2"]["node-clock"]
        assert "+2.500s" in text and "off by more than 1 s" in text and "failed" in classes
        assert "off" not in shown["web-1"]["node-clock"][0]
        assert shown["web-1"]["node-running"][0] == "1" and shown["web-2"]["node-failed"][0] == "1"
        summary = driver.find_element(By.ID, "fleet-summary").text
        assert "1 down" in summary and "1 drifted" in summary and "clock more than 1 s off" in summary
        assert pg.url in summary
        shot(driver, "fleet")

        def history_rows(d):
            return [(r.get_attribute("data-node"), r.get_attribute("data-run"))
                    for r in d.find_elements(By.CSS_SELECTOR, "#fleet-history tbody tr")]

        until(driver, lambda d: {("web-1", "11"), ("web-2", "21"), ("web-3", "31")} <= set(history_rows(d)),
              what="the fleet history")
        from selenium.webdriver.support.select import Select
        Select(driver.find_element(By.ID, "fh-node")).select_by_value("web-2")
        driver.find_element(By.CSS_SELECTOR, "#fleet-filters button[type=submit]").click()
        until(driver, lambda d: history_rows(d) == [("web-2", "21")], what="web-2's runs only")
        Select(driver.find_element(By.ID, "fh-node")).select_by_value("")
        driver.find_element(By.ID, "fh-failed").click()
        driver.find_element(By.CSS_SELECTOR, "#fleet-filters button[type=submit]").click()
        until(driver, lambda d: history_rows(d) == [("web-2", "21")], what="the failed runs only")
        until(driver, lambda d: d.find_element(By.CSS_SELECTOR, '#fleet-history tr[data-run="21"]').click()
              or True, what="a click on the run")
        until(driver, lambda d: "disk full" in d.find_element(By.ID, "fleet-output").text,
              what="the run's stored output")
        shot(driver, "fleet-history-failed")

        driver.get(daemon.base + "#/task/backup")

        shown = until(driver, lambda d: (lambda n: n["web-2"]["fleet-result"][0] == "exit 2" and n)(
            cells(d, "#task-fleet-table")), what="web-2's result on the task page")
        assert "failed" in shown["web-2"]["fleet-result"][1]
        assert shown["web-1"]["fleet-result"][0] == "ok" and shown["web-3"]["fleet-result"][0] == "ok"
        assert "fails on web-2, not on web-1, web-3" in driver.find_element(By.ID, "task-fleet").text
        shot(driver, "task-backup-fleet")
    finally:
        daemon.kill()
        conn.close()
