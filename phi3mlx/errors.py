"""One exception type for user mistakes; the CLI prints it as a single line."""


class Phi3MLXError(Exception):
    """A problem with the user's input (path, config, weights, prompt, flags).

    The message is meant to be shown as is: one line that names the problem.
    Several problems found at once are joined with "; ".
    """

    @classmethod
    def many(cls, problems, prefix=""):
        problems = [p for p in problems if p]
        return cls(prefix + "; ".join(problems))
