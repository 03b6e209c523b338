"""The data tests' isolation: no user cache or data, no system folders, no internet; a quiet local HTTP handler."""

import http.server
import socket

from vaelab.data import sources


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolate(tmp_path, monkeypatch) -> None:
    """The cache lives in tmp_path; no user data, no system folders, and the download mirror refuses."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("VAELAB_DATA", raising=False)
    monkeypatch.setenv("VAELAB_MIRROR", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {})


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
