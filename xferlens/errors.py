"""The base of every error xferlens raises on purpose.

Each xferlens exception also derives from the builtin it has always been (``ValueError``,
``RuntimeError``, ...), so ``except ValueError`` keeps working; ``except XferlensError``
catches them all.

Example:
    >>> from xferlens.errors import XferlensError
    >>> from xferlens.mappers import MapperMismatchError
    >>> issubclass(MapperMismatchError, XferlensError), issubclass(MapperMismatchError, ValueError)
    (True, True)
"""


class XferlensError(Exception):
    """Base of every exception class defined by xferlens."""


class ModelMismatchError(XferlensError, ValueError):
    """An artifact (mapper, steering vector, SAE, activations, pairs) was used with a model
    other than the one it was made with. Each artifact kind raises its own subclass."""
