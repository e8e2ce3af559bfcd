"""The one error type users see for bad input: printed as one line per problem, no traceback."""

from __future__ import annotations

import argparse

from dtrain.config.secrets import redact_text


class ConfigError(ValueError):
    """Bad input that the user fixes by changing the config or the command line."""

    def __init__(self, message: str | list[str]):
        # redacted here, once: messages quote values such as checkpoint.uri=s3://user:pass@host/...
        self.problems = [redact_text(p) for p in ([message] if isinstance(message, str) else message)]
        super().__init__("; ".join(self.problems))

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"dtrain: config error: {self.problems[0]}"
        lines = [f"dtrain: {len(self.problems)} config errors:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ConfigError line (exit 2), like every other bad
    input, instead of a usage block and its own exit."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}; see `{self.prog} --help`")
