"""The exception hierarchy: every error torchcore reports to a user is one of these."""


class TorchcoreError(Exception):
    """Base of every error torchcore raises on purpose; its message is for a user."""


class ConfigError(TorchcoreError):
    """The task file is invalid.

    ``problems`` holds every problem found (one line each, already carrying
    file, line, task and field), so a user sees them all at once.
    """

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DaemonError(TorchcoreError):
    """The daemon cannot be started, reached or stopped."""
