"""The version of lympho-mil (one place: the package, its commands and its reports read it)."""

__version__ = "0.1.0"
