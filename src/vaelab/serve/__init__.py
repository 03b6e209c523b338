"""`vaelab serve`: a run's model over HTTP (a JSON API) and the latent explorer page.

    from vaelab.serve import create_app
    app = create_app("runs/vae-mnist")          # an ASGI app: uvicorn.run(app, host="127.0.0.1", port=8000)

served.py answers every request in plain Python (ServedRun: the run loaded once, the request's checks);
app.py makes it a FastAPI app (routes, errors as JSON, the body limit, the token). The explorer page lives in
static/. FastAPI and uvicorn are the `serve` extra: importing this package needs neither, create_app does.
"""

from __future__ import annotations


def create_app(run_dir, **kwargs):
    """The FastAPI app serving the run in `run_dir` (see vaelab.serve.app.create_app for the keywords)."""
    from vaelab.serve.app import create_app as create

    return create(run_dir, **kwargs)


__all__ = ["create_app"]
