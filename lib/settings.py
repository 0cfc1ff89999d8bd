"""Settings checks of the V-cache methods: each class checks its own settings
and reports every problem at once, so a caller can list them all in one message."""


class BadSettings(ValueError):
    """Settings a method cannot be built from; `problems` holds one line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def check(problems):
    """Raise BadSettings if there is any problem."""
    if problems:
        raise BadSettings(problems)
