"""The built-in rules, one module per operation kind; importing this package registers them (a later module's
registration of the same function replaces an earlier one's: :mod:`.broadcast` extends :mod:`.embedding`)."""

from . import addmm, attention, broadcast, conv, elementwise, embedding, linear, norm, recurrent, views

__all__ = ["addmm", "attention", "broadcast", "conv", "elementwise", "embedding", "linear", "norm", "recurrent",
           "views"]
