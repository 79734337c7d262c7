"""The torch-free commands: ``galr-run`` (:mod:`.run`) and ``galr-index`` (:mod:`.index`).

Each is a thin click layer: it parses arguments, calls the library, prints what happened. Errors
are :class:`galr.errors.GalrError`\\ s that :class:`galr.console.GalrCommand` turns into one line
and the exit code of the shared table.
"""
