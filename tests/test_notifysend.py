"""Sending to hostile or odd receivers (torchcore/notifysend.py), on loopback servers in threads:
credentials written in a webhook's URL, a receiver that answers a byte at a time or with
garbage.  A try always ends within its timeout with a verdict, never an exception."""

import base64
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from notify_receivers import HttpReceiver

from torchcore import notifysend
from torchcore.notifyspec import Target


def webhook(url):
    return Target(kind="webhook", url=url)


BODY = {"id": "n-1-failure", "output_tail": ""}


@pytest.fixture(scope="module")
def receiver():
    made = HttpReceiver()
    yield made
    made.close()


@settings(max_examples=25, deadline=None)
@given(user=st.text(min_size=1, max_size=12), password=st.text(max_size=12))
def test_credentials_in_a_webhook_url_are_sent_as_basic_authentication(receiver, user, password):
    receiver.requests.clear()
    if True:
        quoted = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        url = f"http://{quoted}@127.0.0.1:{receiver.port}/hook?x=1"
        sent = notifysend.send(webhook(url), "failure", BODY, timeout=5)
        assert sent.state == "sent", sent
        path, headers, _ = receiver.requests[0]
        assert path == "/hook?x=1"
        assert headers["Authorization"] == "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode()


class RawReceiver:
    """Answers each connection by calling ``answer(conn, closed)`` (after reading the request,
    unless ``speaks_first``); ``close`` ends every thread it started (later tests of the same
    process check that the supervisor's process has no threads)."""

    def __init__(self, answer, speaks_first=False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.speaks_first = speaks_first
        self.closed = threading.Event()
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._one, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _one(self, conn):
        try:
            conn.settimeout(1.0)
            if not self.speaks_first:
                conn.recv(65536)
            self.answer(conn, self.closed)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.closed.set()
        for thread in list(self.threads):
            thread.join(5)
        self.sock.close()


def trickle_headers(conn, closed):
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not closed.wait(0.2):
        conn.sendall(b"X-Slow: 1\r\n")


def trickle_body(conn, closed):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    while not closed.wait(0.2):
        conn.sendall(b"x")


def garbage(conn, closed):
    conn.sendall(b"\x1b[31mnot http at all\r\n\r\n")


def test_no_thread_is_left_behind():
    receiver = RawReceiver(trickle_body)
    notifysend.send(webhook(f"http://127.0.0.1:{receiver.port}/"), "failure", BODY, timeout=0.3)
    receiver.close()
    assert not any(thread.is_alive() for thread in receiver.threads)


@pytest.mark.slow     # waits out real timeouts: not a unit test
def test_a_receiver_answering_a_byte_at_a_time_is_given_up_at_the_timeout():
    for answer in (trickle_headers, trickle_body):
        receiver = RawReceiver(answer)
        try:
            began = time.monotonic()
            sent = notifysend.send(webhook(f"http://127.0.0.1:{receiver.port}/"), "failure", BODY,
                                   timeout=1.0)
            assert time.monotonic() - began < 2.5, answer.__name__
            assert sent.state == "retry" and "within 1s" in sent.detail
        finally:
            receiver.close()


def test_a_receiver_answering_garbage_is_retried_not_raised():
    receiver = RawReceiver(garbage)
    try:
        for target in (webhook(f"http://127.0.0.1:{receiver.port}/"),
                       Target(kind="ping", url=f"http://127.0.0.1:{receiver.port}/p", on=(), every=0)):
            sent = notifysend.send(target, "fail", BODY, timeout=2.0)
            assert sent.state == "retry", sent
            assert "://" not in sent.detail
    finally:
        receiver.close()


def trickle_smtp(conn, closed):
    while not closed.wait(0.2):
        conn.sendall(b"220-still greeting\r\n")


@pytest.mark.process
def test_a_mail_server_answering_a_line_at_a_time_is_given_up_at_the_timeout():
    """In a child process: Apprise sends from a worker thread it may leave running, and later
    tests of this process check that the supervisor's process has no threads."""
    receiver = RawReceiver(trickle_smtp, speaks_first=True)
    try:
        began = time.monotonic()
        out = subprocess.run([sys.executable, "-c", (
            "from torchcore import notifysend; sent = notifysend.apprise_send("
            f"'mailto://127.0.0.1:{receiver.port}?to=ops@example.com&from=tc@example.com', "
            "'subject', 'body', timeout=1.5); print(sent.state, sent.detail, flush=True); import os; os._exit(0)")],
            capture_output=True, text=True, timeout=30)
        assert time.monotonic() - began < 5.0, out
        assert out.stdout.startswith("retry ") and "within 1.5s" in out.stdout, out
    finally:
        receiver.close()
