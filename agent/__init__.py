"""GenCLIP Inspect agent: cameras in, scores out to MQTT and Redis Streams."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genclip-inspect")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
