"""Drive headless Chromium from tests with the standard library only.

Chromium speaks the DevTools protocol (CDP) over a pair of pipes when started with
--remote-debugging-pipe: it reads commands from fd 3 and writes replies and events to fd 4, each message a
JSON text ended by a NUL byte. Playwright uses the same transport. Pipes need no port, no websocket
library and no package beyond Debian's chromium, which is all scripts/install_browser.sh installs.

    with Browser() as b:
        b.open(Path("circuit.html"))
        n = b.evaluate("document.querySelectorAll('.node').length")
        b.screenshot("shot.png")
        assert not b.errors
"""
from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

# Flags known to work on this closed network (see the machine notes): without the background-networking
# ones Chromium keeps trying to reach Google's hosts. --no-sandbox because tests may run as root.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None. $CHROMIUM overrides the search."""
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page; a context manager that always ends the process."""

    def __init__(self, executable: str | None = None, width: int = 1400, height: int = 900,
                 timeout: float = 20.0):
        exe = executable or find_chromium()
        if not exe:
            raise BrowserError("no chromium executable found")
        self.timeout = timeout
        self.errors: list[str] = []      # uncaught exceptions, console.error and error log entries
        self.events: "queue.Queue[dict]" = queue.Queue()
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self._profile = tempfile.mkdtemp(prefix="minicirc-chromium-")

        # Our ends stay close-on-exec (Python's default); Chromium's ends are moved to fds 3 and 4 in
        # the child. Going through fds >= 10 first means the two dup2 calls can never clobber each other.
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def child_fds():
            r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [exe, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
                "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=child_fds, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        # Drain stderr so a chatty Chromium can never block on a full pipe; keep it for error messages.
        self._stderr: list[bytes] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        threading.Thread(target=self._read_loop, daemon=True).start()
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except Exception:
            self.close()
            raise

    # ---- transport -------------------------------------------------------------------------------
    def _drain_stderr(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _read_loop(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self._on_event(msg)

    _closed = False

    def _on_event(self, msg: dict):
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                            for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append("log: " + params["entry"].get("text", ""))
        self.events.put(msg)

    def call(self, method: str, session: bool = False, **params):
        """Send one CDP command and wait for its reply; raises BrowserError on a protocol error."""
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "chromium exited" if self._closed else f"no reply in {self.timeout} s"
                    tail = b"".join(self._stderr[-20:]).decode(errors="replace")
                    raise BrowserError(f"{method}: {why}\n{tail}")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # ---- page helpers ----------------------------------------------------------------------------
    def open(self, path_or_url, ready: str = "document.readyState === 'complete'"):
        """Load a page and wait until the JS expression `ready` is true."""
        url = path_or_url if "://" in str(path_or_url) else Path(path_or_url).resolve().as_uri()
        self.call("Page.navigate", session=True, url=url)
        # Page.navigate answers before the new document exists: wait until it is this URL, fully loaded.
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete' && ({ready})")

    def wait_for(self, expression: str, timeout: float | None = None):
        """Poll until the JS expression is truthy; an exception in it (page still loading) counts as false."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.evaluate(f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"):
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression!r}; page errors: {self.errors}")
            time.sleep(0.05)

    def evaluate(self, expression: str):
        """Value of a JS expression in the page (JSON-able values only)."""
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise BrowserError(d.get("exception", {}).get("description", d.get("text")))
        return res["result"].get("value")

    def screenshot(self, path, full_page: bool = True) -> Path:
        """PNG of the page; with full_page the viewport grows to the document's size first."""
        if full_page:
            # Content may scroll inside an element (overflow: auto) rather than the document: grow the
            # viewport by what each such element hides.
            w, h = self.evaluate("""(() => {
                let dw = 0, dh = 0;
                for (const e of document.querySelectorAll('*')) {
                  const st = getComputedStyle(e);
                  if (/auto|scroll/.test(st.overflowX)) dw = Math.max(dw, e.scrollWidth - e.clientWidth);
                  if (/auto|scroll/.test(st.overflowY)) dh = Math.max(dh, e.scrollHeight - e.clientHeight);
                }
                const d = document.documentElement;
                return [d.scrollWidth + dw, d.scrollHeight + dh]; })()""")
            w, h = math.ceil(w), math.ceil(h)
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=int(w), height=int(h),
                      deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # ---- shutdown --------------------------------------------------------------------------------
    def close(self):
        if self.proc.poll() is None:
            try:
                os.write(self._to_child, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()   # only the process this object started
                self.proc.wait(5)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
