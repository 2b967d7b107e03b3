"""Exceptions that the CLI turns into one clear line instead of a traceback."""


class StellarError(Exception):
    """Base class for errors a user can act on (bad config, bad input, missing Java)."""


class ConfigError(StellarError):
    """A configuration file or override is invalid; the message names the key."""


class JavaNotFoundError(StellarError):
    """No Java 17+ runtime could be found for Spark."""
