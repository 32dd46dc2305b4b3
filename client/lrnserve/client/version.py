"""The lrnserve version, shared by the client, the server and the packaging (hatch reads it here)."""

__version__ = "0.1.0"
