"""`vaelab serve RUN`: the run's model over HTTP (the JSON API of vaelab.serve) and the latent explorer page."""

from __future__ import annotations

import argparse
import sys

from vaelab.cli.common import add_trust_code, positive, sub
from vaelab.errors import ConfigError, VaelabError

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # vaelab.serve.app.LOOPBACK, without importing FastAPI for --help


def add_serve_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "serve", """
        Serve the run's model over HTTP until Ctrl-C: a JSON API (encode, decode, reconstruct, sample,
        interpolate, traverse, anomaly scores, the run's metrics and pictures; see /docs) and the latent
        explorer page at /. The model is loaded once, in fp32 on the CPU.

        It listens on 127.0.0.1 (this machine only) by default. Any other address (--host 0.0.0.0) needs
        --token: every request must then carry `Authorization: Bearer TOKEN` (or ?token=TOKEN in the address).
        Needs the serve extra: pip install "vaelab[serve]".""")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_serve_arguments(p) -> None:
    """RUN and every flag of the server (vaelab explore takes them too)."""
    p.add_argument("run", metavar="RUN", help="a run directory written by `vaelab train` (its --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [default 127.0.0.1]")
    p.add_argument("--port", type=int, default=8000,
                   help="port to listen on (0: a free one, printed once listening) [default 8000]")
    p.add_argument("--token", default=None, metavar="T",
                   help="a secret every request must carry (required for a --host other than 127.0.0.1, "
                        "localhost or ::1)")
    p.add_argument("--max-batch", type=int, default=1024, metavar="N",
                   help="the most rows (images, latent points, samples) one request may carry [default 1024]")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder holding the dataset files, if they moved since training (the latent map and "
                        "the test images need the run's test split)")
    add_trust_code(p)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if token is not None and not token.strip():
        raise VaelabError("--token is empty; give a secret string (e.g. from `python -c \"import secrets; "
                          "print(secrets.token_urlsafe())\"`)")
    if host.strip("[]") not in LOOPBACK and token is None:
        raise VaelabError(f"--host {host} would let other machines reach this server, and the API runs the model "
                          "for whoever asks; give --token T as well (every request must then carry "
                          "'Authorization: Bearer T'), or keep the default --host 127.0.0.1")


def url(host: str, port: int, token: str | None = None) -> str:
    shown = host.strip("[]")
    shown = "127.0.0.1" if shown in ("0.0.0.0", "") else ("[::1]" if shown == "::" else shown)
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def bound_port(server, asked: int) -> int:
    """The port uvicorn's server listens on (asked, unless asked was 0 and the system chose one)."""
    for s in getattr(server, "servers", []):
        for sock in getattr(s, "sockets", []) or []:
            return sock.getsockname()[1]
    return asked


def cmd_serve(args) -> int:
    return run_server(args)


def run_server(args, on_listening=None) -> int:
    """Check the flags (the host/token rule), build the app and serve it until Ctrl-C. on_listening(url), when
    given, is called (from another thread) once the socket listens; url is the page's, with ?token=T."""
    check_bind(args.host, args.token)
    positive(args.max_batch, "--max-batch")
    if not 0 <= args.port <= 65535:
        raise VaelabError(f"--port {args.port} is not a port number; give one in 1..65535, or 0 for a free one")
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("`vaelab serve` needs uvicorn and FastAPI: pip install \"vaelab[serve]\"", "setup") \
            from None
    from vaelab.serve import create_app

    app = create_app(args.run, token=args.token, max_batch=args.max_batch, trust_code=args.trust_code,
                     data_dir=args.data_dir)
    served = app.state.served
    if served.data is None:
        print(f"vaelab: warning: {served.data_problem}; the latent map, test images and test scores are "
              "unavailable", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host.strip("[]"), port=args.port, log_level="warning"))

    def announce():  # once the socket listens: the address to open, then the caller's hook
        import time

        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            port = bound_port(server, args.port)  # --port 0: the one the system chose
            page = url(args.host, port, args.token)
            print(f"serving {args.run} ({served.model.config.model}) at {page}  (API docs: "
                  f"{url(args.host, port)}docs; Ctrl-C stops)", flush=True)
            if on_listening is not None:
                on_listening(page)

    import threading

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn could not listen; it has said why (the port is taken, the address is not ours)
        server.should_exit = True
        raise VaelabError(f"could not listen on {args.host}:{args.port}; is the port in use? try another --port") \
            from None
    return 0
