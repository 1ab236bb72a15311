"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A bad argument, unreadable URI or malformed config; the message names what and where."""


class ConfigError(UserError):
    """A config file or `--set` override that does not fit the expected schema."""
