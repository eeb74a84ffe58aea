"""The dashboard of a running daemon in a real browser: Debian's chromium, headless, driven by
selenium through /usr/bin/chromedriver.  One browser for the module, and a daemon per test (the
second with settings.http.auth: all); screenshots of each page go to the test's tmp dir.  Skipped when chromium or its driver is not installed
(tests/setup-system.sh installs both)."""

import os
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
