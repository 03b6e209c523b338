"""vaelab's error types. Every problem a user can fix is raised as one of these, never as `assert`.

Messages say what was given, what was expected, and what to do. The CLI prints them without a traceback.
"""


class VaelabError(Exception):
    """Base class of every error vaelab raises on purpose."""


class ConfigError(VaelabError, ValueError):
    """An impossible or inconsistent configuration value (all problems are listed together)."""

    def __init__(self, problems, context="configuration"):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = f"invalid {context}: {self.problems[0]}"
        else:
            msg = f"invalid {context} ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(msg)


class DataError(VaelabError, ValueError):
    """A dataset that cannot be found, downloaded, read or used (names the file and the problem)."""


class CheckpointError(VaelabError, ValueError):
    """A checkpoint or pretrained directory that is missing, corrupt, unsafe or incompatible."""


class TrainingError(VaelabError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""
