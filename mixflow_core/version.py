"""The package version: a leaf module that every layer may import."""

__version__ = "0.2.0"
