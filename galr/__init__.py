"""GaLR remote-sensing text-image retrieval, packaged for deployment.

Importing :mod:`galr` is cheap and torch-free; the torch model lives in :mod:`galr.model`,
the torch-free serving side in :mod:`galr.runtime`.
"""

__version__ = "0.1.0"
