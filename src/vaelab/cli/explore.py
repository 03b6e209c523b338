"""`vaelab explore RUN`: `vaelab serve RUN` (the same flags, the same server: vaelab.cli.serve) that also opens
the latent explorer page in the user's browser once the server listens (--no-browser: print its address only)."""

from __future__ import annotations

import argparse

from vaelab.cli.common import sub
from vaelab.cli.serve import add_serve_arguments, run_server


def add_explore_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "explore", """
        Serve the run as `vaelab serve` does and open the latent explorer in your web browser: the latent map
        of the test split (PCA beyond two dimensions), the decoded image under the pointer, interpolations
        between two points, one slider per latent dimension sorted by KL, a class selector for conditional
        models, a VQ-VAE's code grid to paint, the anomaly score histogram with a threshold, and the run's
        training curves and pictures. The page needs no internet connection.

        The browser is Python's `webbrowser` default (the BROWSER environment variable picks another). With
        --no-browser, or where no browser can be started, the page's address is printed: open it yourself
        (when a --token is set the address carries it as ?token=..., which the page passes on). Ctrl-C stops
        the server.""")
    add_serve_arguments(p)
    p.add_argument("--browser", action=argparse.BooleanOptionalAction, default=True,
                   help="open the page in the default web browser once the server listens [default on]")
    p.set_defaults(func=cmd_explore)
    return p


def cmd_explore(args) -> int:
    # run_server calls on_listening from a thread of its own once the socket listens (uvicorn blocks this one)
    return run_server(args, on_listening=lambda url: open_page(url, args.browser))


def open_page(url: str, browser: bool) -> bool:
    """Open `url` (the page, with ?token=T when a token is set) in the default browser unless told not to;
    say where the page is either way. True when a browser was started."""
    opened = False
    if browser:
        import webbrowser

        try:
            opened = webbrowser.open(url)
        except Exception:  # noqa: BLE001 - a broken browser set-up must not stop the server
            opened = False
    if opened:
        print(f"opened the explorer in your browser: {url}", flush=True)
    elif browser:
        print(f"no browser could be started here; open the explorer yourself: {url}", flush=True)
    else:
        print(f"the explorer: {url}", flush=True)
    return opened
