"""lrnserve's Python client SDK (grpcio, protobuf and numpy only; no torch)."""

from ._version import __version__

__all__ = ["__version__"]
