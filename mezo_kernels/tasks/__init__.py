"""Tasks: the records (``Task``, ``Example``), task specs, the registry of built-in tasks, LM-BFF templates, data
files, metrics and the objectives that turn a model and a batch of examples into losses.

Bottom to top: ``records`` (and ``lmbff``) < ``spec`` < ``registry`` < ``files`` < ``data``; ``metrics`` <
``objectives``.
"""
