"""``galr-serve``: the HTTP service (FastAPI), its dynamic batching, limits and search page.

Needs the ``serve`` extra (``pip install 'galr[serve]'``: FastAPI, uvicorn, prometheus-client,
python-multipart). See :mod:`galr.runtime.serve.app` for the routes.
"""

from galr.runtime.serve.settings import ServeSettings, is_loopback


def create_app(*args, **kwargs):
    """The FastAPI application (:func:`galr.runtime.serve.app.create_app`; imported on use)."""
    from galr.runtime.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["ServeSettings", "create_app", "is_loopback"]
