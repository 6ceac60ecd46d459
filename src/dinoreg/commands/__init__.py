"""Sub-commands that live next to their feature.

Every module in this package is imported by ``dinoreg.cli`` and registers its commands with
``dinoreg.cli.command`` (see ``cli.py`` for the pattern: the decorated function adds the
arguments, ``.handler`` binds the function that runs it and returns the exit status).
"""
