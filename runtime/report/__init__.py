"""Output formats of search results: a terminal table (:mod:`.table`) and a self-contained HTML
contact sheet (:mod:`.html`). JSON is :meth:`QueryResult.to_dict` as it is. A new format is a new
module here, called from :mod:`galr.runtime.cli.run`.
"""
