"""The local web page behind ``ddfm-fast serve``.

* :mod:`ddfm_fast.web.jobs`: checked uploads, one fusion at a time per model, live progress and cancel (no web
  framework needed, so it is tested on its own).
* :mod:`ddfm_fast.web.app`: the Starlette application (the optional ``web`` extra) over the job manager, and the
  static page under ``static/``.
"""
