"""rayalign: Ray-native, plugin-based alignment of large language models."""

__version__ = "0.1.0"
