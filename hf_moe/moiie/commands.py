"""MoIIE's `hf-moe` sub-commands. Only the standard library is imported here: `hf-moe --help` reads `COMMANDS`
without importing torch or transformers; each command imports its module when it runs."""

from collections.abc import Callable


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {}
