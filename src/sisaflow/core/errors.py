"""Exceptions a user can act on. The CLI prints their message and exits non-zero."""


class SisaflowError(Exception):
    """Base class: anything the user can fix (bad input, bad params, missing files)."""


class ConfigError(SisaflowError):
    """params.yaml is missing, malformed, or holds an invalid value."""


class CorpusError(SisaflowError):
    """The corpus file is missing, empty or malformed."""


class ShardingError(SisaflowError):
    """The corpus cannot be split as params ask (for example more shards than owners)."""


class DeletionError(SisaflowError):
    """A deletion request names unknown owners or records, or is malformed."""


class WorkspaceError(SisaflowError):
    """The workspace is missing, not initialised, or in a state a command cannot work from."""


class ExternalToolError(SisaflowError):
    """A tool sisaflow drives (DVC, git, Ray) failed."""
