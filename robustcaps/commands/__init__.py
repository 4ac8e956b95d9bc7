"""One module per CLI subcommand; each exposes ``command``. See :mod:`robustcaps.cli`."""
