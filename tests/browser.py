"""Headless Chromium over the DevTools protocol, for pages behind a login (Label Studio's): set the
session cookie, open the page, read its text and take a screenshot. Pages without a login are
rendered with plain command-line flags (tests/test_operators.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import websockets

from tests.service_helpers import free_port


def chromium() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


async def _page(ws_url: str, url: str, cookies: list[dict], width: int, height: int, settle_s: float) -> tuple[str, bytes]:
    async with websockets.connect(ws_url, max_size=64 * 1024 * 1024) as ws:
        counter = {"id": 0}

        async def call(method: str, **params):
            counter["id"] += 1
            mine = counter["id"]
            await ws.send(json.dumps({"id": mine, "method": method, "params": params}))
            while True:
                message = json.loads(await ws.recv())
                if message.get("id") == mine:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})

        await call("Network.enable")
        for cookie in cookies:
            await call("Network.setCookie", **cookie)
        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await call("Page.enable")
        await call("Page.navigate", url=url)
        await asyncio.sleep(settle_s)  # a single-page app: let it fetch and draw its data
        text = (await call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True))["result"].get("value", "")
        png = base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])
        return text, png


def open_page(url: str, cookies: list[dict], width: int = 1280, height: int = 860, settle_s: float = 8.0) -> tuple[str, bytes]:
    """(visible text, PNG screenshot) of `url` in headless Chromium with `cookies` set first."""
    binary = chromium()
    assert binary is not None, "chromium-headless-shell is not installed (make chromium)"
    port = free_port()
    profile = tempfile.mkdtemp(prefix="driftloop-chromium-")
    headless = [] if binary.endswith("headless-shell") else ["--headless"]
    proc = subprocess.Popen([binary, *headless, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--remote-debugging-port={port}",
                             f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # Debian's chromium-headless-shell is a shell script: the browser is its child
    try:
        deadline = time.time() + 30
        pages = []
        while time.time() < deadline and not pages:
            try:
                pages = [p for p in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json() if p.get("type") == "page"]
            except httpx.HTTPError:
                time.sleep(0.2)
        assert pages, "Chromium's DevTools endpoint did not come up"
        return asyncio.run(_page(pages[0]["webSocketDebuggerUrl"], url, cookies, width, height, settle_s))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: killing the script alone left the browser running
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def label_studio_login(base_url: str, email: str, password: str) -> list[dict]:
    """Label Studio's session cookie for this user (its login form, CSRF included), as DevTools cookies."""
    with httpx.Client(base_url=base_url, timeout=30, follow_redirects=False) as client:
        client.get("/user/login/")
        csrf = client.cookies.get("csrftoken")
        response = client.post("/user/login/", data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
                               headers={"Referer": f"{base_url}/user/login/"})
        assert response.status_code in (302, 303), f"Label Studio login failed: HTTP {response.status_code}"
        session = client.cookies.get("sessionid")
    assert session, "Label Studio set no session cookie"
    return [{"name": "sessionid", "value": session, "url": base_url}, {"name": "csrftoken", "value": csrf, "url": base_url}]


def keep_screenshot(png: bytes, name: str) -> Path:
    """Write the screenshot to a temp file, and into $DRIFTLOOP_SCREENSHOTS (the README's images) when set."""
    import os

    path = Path(tempfile.mkdtemp(prefix="driftloop-shot-")) / name
    path.write_bytes(png)
    keep = os.environ.get("DRIFTLOOP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path
