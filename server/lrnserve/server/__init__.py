"""lrnserve's server side: LRN operators, the classic LRN networks, and (later) the service."""

from lrnserve.client.version import __version__

__all__ = ["__version__"]
