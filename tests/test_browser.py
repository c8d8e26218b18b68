"""The quick start in a real browser: headless Chromium (Debian's ``chromium``, driven by
Debian's ``chromium-driver`` through Selenium) loads the demo chat page through chatproxy
over https and chats over wss.

Nothing is downloaded: the driver path is given to Selenium explicitly, so Selenium Manager
never runs.  The browser trusts exactly the public key of the self-signed certificate that
chatproxy creates on first start (``--ignore-certificate-errors-spki-list``), not every
certificate.  Everything stays on loopback.  Screenshots go to the test's tmp dir: one per
browser at the end of a passing test, and ``failure-*.png`` when a test fails.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT = 15.0  # seconds, for every wait on the page
T = TypeVar("T")


def _require_browser() -> None:
    """Skip (or, under CI, fail) when Debian's chromium, its driver or Selenium is missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package (pip install '.[test]')")
    if not missing:
        return
    message = ("the headless-browser test needs Debian's chromium and chromium-driver "
               "(apt-get install chromium chromium-driver) and Selenium; missing: " + ", ".join(missing))
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message + " (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def quickstart(proxy: Any, tmp_path: Path) -> tuple[int, Path]:
    """twistd on etc/chatproxy.ini with only its two port numbers substituted (as in
    test_quickstart.py); returns the https port and the self-signed certificate it created."""
    _require_browser()
    text = (ROOT / "etc" / "chatproxy.ini").read_text()
    https_port, demo_port = free_port(), free_port()
    assert "8443" in text and "8081" in text
    proxy.start(text.replace("8443", str(https_port)).replace("8081", str(demo_port)), port=https_port,
                workers=None)  # as shipped: one worker per CPU
    wait_for_port(demo_port)
    certificate = tmp_path / "tls" / "localhost.crt"
    assert certificate.is_file(), "the quick start did not create tls/localhost.crt"
    return https_port, certificate


def _spki_hash(certificate: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)), the form ``--ignore-certificate-errors-spki-list`` takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(certificate.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Browsers:
    """Headless Chromium instances for one test, each with its own fresh profile."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.drivers: dict[str, Any] = {}

    def open(self, name: str, certificate: Path | None) -> Any:
        """Start a browser that trusts ``certificate``'s key (None: plain http only); returns its Selenium driver."""
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
                     "--no-proxy-server",  # loopback only, whatever the environment's proxy settings
                     "--window-size=1000,760"):
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.dir / ('profile-' + name)}")
        if certificate is not None:
            options.add_argument(f"--ignore-certificate-errors-spki-list={_spki_hash(certificate)}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # An explicit driver path: Selenium Manager is skipped and downloads nothing.
        service = Service(executable_path=CHROMEDRIVER, log_output=str(self.dir / f"chromedriver-{name}.log"))
        driver = webdriver.Chrome(options=options, service=service)
        self.drivers[name] = driver
        driver.set_page_load_timeout(TIMEOUT)
        driver.set_script_timeout(TIMEOUT)
        return driver

    def screenshot(self, label: str) -> list[Path]:
        """Save ``<label>-<name>.png`` for every browser; returns the paths written."""
        paths = []
        for name, driver in self.drivers.items():
            path = self.dir / f"{label}-{name}.png"
            try:
                if driver.save_screenshot(str(path)):
                    paths.append(path)
            except Exception:  # a dead browser has nothing to show; the test's own error matters
                pass
        return paths

    @contextmanager
    def screenshots_on_failure(self) -> Iterator[None]:
        """On any error inside, save ``failure-*.png`` and note them (and the consoles) on the error."""
        try:
            yield
        except BaseException as error:
            for path in self.screenshot("failure"):
                error.add_note(f"screenshot: {path}")
            for name, driver in self.drivers.items():
                try:
                    for entry in driver.get_log("browser"):
                        error.add_note(f"{name} console: {entry.get('level')} {entry.get('message')}")
                except Exception:
                    pass
            raise

    def quit_all(self) -> None:
        """Quit every browser (chromedriver ends its Chromium) and its driver process."""
        for driver in self.drivers.values():
            try:
                driver.quit()
            except Exception:
                pass
        self.drivers.clear()


@pytest.fixture
def browsers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browsers]:
    """Headless Chromium instances for a test; all quit afterwards."""
    _require_browser()
    # Selenium talks to chromedriver on localhost: never through an environment proxy.
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1,::1")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,::1")
    started = Browsers(tmp_path)
    yield started
    started.quit_all()


def _wait(driver: Any, check: Callable[[Any], T], what: str) -> T:
    """Poll ``check(driver)`` until it returns something truthy, at most TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = check(driver)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {TIMEOUT}s: {what}; page status {_status(driver)!r}, "
                                 f"log {_log_lines(driver, chat_only=False)!r}")
        time.sleep(0.05)


def _status(driver: Any) -> str:
    return str(driver.execute_script("return document.getElementById('status')?.textContent ?? null"))


def _log_lines(driver: Any, chat_only: bool = True) -> list[str]:
    """The text of the <p> elements in #log (only chat messages, not the italic system lines)."""
    selector = "#log p:not(.sys)" if chat_only else "#log p"
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), p => p.textContent)", selector))


def _open_chat(driver: Any, port: int, name: str) -> None:
    """Load the demo page through the proxy, wait for its WebSocket, and set the chat name."""
    from selenium.webdriver.common.by import By

    url = f"https://localhost:{port}/"
    driver.get(url)
    assert driver.title == "chatproxy demo chat", f"{url} shows {driver.title!r}, not the demo page"
    assert driver.execute_script("return location.protocol") == "https:"
    _wait(driver, lambda d: _status(d) == "connected", "the page's WebSocket did not open")
    assert f"connected to wss://localhost:{port}/chat" in _log_lines(driver, chat_only=False)
    field = driver.find_element(By.ID, "name")
    field.clear()
    field.send_keys(name)


def _say(driver: Any, text: str, *, press_enter: bool = False) -> None:
    """Type ``text`` into #text and submit the form with #send (or the Enter key)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, "text")
    field.send_keys(text)
    if press_enter:
        field.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()
    _wait(driver, lambda d: d.find_element(By.ID, "text").get_attribute("value") == "",
          "the page did not send (the message field was not cleared)")


def test_browser_loads_the_demo_page_over_https_and_chats_over_wss(quickstart: tuple[int, Path],
                                                                  browsers: Browsers) -> None:
    """Headless Chromium opens https://localhost:PORT/ through chatproxy, trusting only the
    generated self-signed certificate; the page's WebSocket to wss://localhost:PORT/chat opens
    ("connected"), and a message typed and sent with #send comes back into #log."""
    port, certificate = quickstart
    page = browsers.open("alice", certificate)
    with browsers.screenshots_on_failure():
        _open_chat(page, port, "alice")
        _say(page, "hello through chatproxy ✓")
        _wait(page, lambda d: "alice: hello through chatproxy ✓" in _log_lines(d),
              "the message did not come back into #log")
        assert _log_lines(page) == ["alice: hello through chatproxy ✓"]
        assert _status(page) == "connected"
    browsers.screenshot("success")


def test_browser_uses_http2_for_the_page_and_the_websocket(quickstart: tuple[int, Path], browsers: Browsers,
                                                         proxy: Any) -> None:
    """Chromium negotiates HTTP/2 with chatproxy (ALPN) for the page, and opens the chat's
    WebSocket over that HTTP/2 connection (RFC 8441 extended CONNECT, which chatproxy
    advertises): the access log shows both as HTTP/2, the 101 line for the session."""
    port, certificate = quickstart
    page = browsers.open("alice", certificate)
    with browsers.screenshots_on_failure():
        _open_chat(page, port, "alice")
        _say(page, "over h2")
        _wait(page, lambda d: "alice: over h2" in _log_lines(d), "the message did not come back into #log")
    page.quit()  # the session ends: its access-log line is written
    process = proxy.processes[-1]
    deadline = time.monotonic() + TIMEOUT
    while '"GET /chat HTTP/2" 101' not in process.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    output = process.output()
    assert '"GET / HTTP/2" 200' in output, output[-2000:]
    assert '"GET /chat HTTP/2" 101' in output, output[-2000:]


def test_browser_two_pages_chat_with_each_other_over_wss(quickstart: tuple[int, Path], browsers: Browsers) -> None:
    """Two headless Chromium instances (separate profiles) on the demo page through chatproxy:
    a message sent from one appears in the other's #log, and the reply (sent with the Enter
    key) appears in the first; both logs show the same conversation in the same order."""
    port, certificate = quickstart
    alice = browsers.open("alice", certificate)
    bob = browsers.open("bob", certificate)
    with browsers.screenshots_on_failure():
        _open_chat(alice, port, "alice")
        _open_chat(bob, port, "bob")
        _say(alice, "hi bob, this went through the proxy")
        _wait(bob, lambda d: "alice: hi bob, this went through the proxy" in _log_lines(d),
              "bob did not receive alice's message")
        _say(bob, "hi alice — got it ✓", press_enter=True)
        conversation = ["alice: hi bob, this went through the proxy", "bob: hi alice — got it ✓"]
        for driver in (alice, bob):
            _wait(driver, lambda d: _log_lines(d) == conversation, "the conversation is not the same on both pages")
        assert _status(alice) == _status(bob) == "connected"
    browsers.screenshot("success")
