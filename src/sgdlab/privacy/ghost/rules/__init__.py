"""The built-in rules, one module per operation kind; importing this package registers them."""

from . import conv, elementwise, embedding, linear, norm, recurrent, views

__all__ = ["conv", "elementwise", "embedding", "linear", "norm", "recurrent", "views"]
