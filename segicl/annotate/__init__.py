"""``segicl annotate``: segment a folder of images interactively in a local browser app.

:mod:`segicl.annotate.state` keeps the session (accepted masks, order, the current image and its
pending interactions) on disk, atomically; :mod:`segicl.annotate.app` serves the page and its JSON API
on 127.0.0.1 with the standard library's HTTP server; :mod:`segicl.annotate.export` writes the
accepted set as a dataset. See docs/annotate.md.
"""
