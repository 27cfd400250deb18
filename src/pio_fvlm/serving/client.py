"""A small client for a running ``pio-fvlm serve``: start one in a subprocess, send chat requests.

Used by the tests and the load benchmark; handy for checking a deployment by hand::

    with ServerProcess(["--budget", "64"]) as server:
        answer = post_chat(server.url, chat_body("how many shapes ?", image))
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from .server import DEMO_NAME


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def image_data_url(image: Any, image_format: str = "PNG") -> str:
    """A ``data:image/...;base64,...`` URL of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(question: str, image: Any = None, model: str | None = DEMO_NAME, **fields: Any) -> dict[str, Any]:
    """An OpenAI chat completion request: one user message with an image (if given) and ``question``."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    content.append({"type": "text", "text": question})
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], **fields}
    if model is not None:
        body["model"] = model
    return body


def post_chat(url: str, body: dict[str, Any] | bytes, timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` to ``url``'s chat completions: (status, headers, decoded JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            detail = json.loads(body or b"null")
        except json.JSONDecodeError:  # a proxy's plain-text error page (Ray Serve's 5xx, say)
            detail = {"detail": body.decode(errors="replace")}
        return error.code, dict(error.headers), detail


class ServerProcess:
    """``pio-fvlm serve ARGS`` in a subprocess on a free port, stopped on exit.

    Args:
        args: the command's arguments (model and settings).
        startup_timeout: seconds to wait for ``/health``.
    """

    def __init__(self, args: list[str] | None = None, startup_timeout: float = 180) -> None:
        self.args = list(args or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # the server's output; a pipe nobody reads would fill and block it

    def __enter__(self) -> ServerProcess:
        command = [sys.executable, "-m", "pio_fvlm.cli", "serve", *self.args, "--port", str(self.port)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pio-fvlm serve exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"pio-fvlm serve did not answer /health within {self.startup_timeout} s")

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
