"""Offline voice assistant whose language-model stage uses speculative decoding."""

__version__ = "0.1.0"
