"""The final ensemble in use: a loadable bundle (``serve.bundle``), ``predict.py``'s library
(``serve.predict``) and the Flask service (``serve.app``, run by waitress in ``serve.wsgi``);
the three commands' options in ``serve.config`` and their entry points in ``serve.cli``.

The top of the import graph: it may import ``backbones`` (fold models) and ``ensemble`` (the
saved stacker); nothing below imports it.
"""
