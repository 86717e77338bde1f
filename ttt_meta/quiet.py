"""Third-party notices that a user of ttt_meta cannot act on, silenced narrowly (by message and source) for our
own runs only; importing ttt_meta changes no global filter.

- learn2learn imports gym, whose import prints a four-line "Gym has been unmaintained" banner on stderr:
  ``learn2learn()`` imports it with that banner swallowed (MAML, Meta-SGD and the downloads only need it).
- Lightning's litlogger tip, torch's ``LeafSpec`` deprecation (raised inside Lightning), Lightning's warnings about
  an IterableDataset with ``__len__`` (ours shards itself by worker, ``data.datamodule.TrainEpisodes``) and about
  a mid-epoch resume (ours resumes through the data module's state), and LightningCLI's note that it was given
  both ``args`` and a command line (``cli.main`` passes the command line after composing its config files):
  ``silence_library_notices()``, which the CLI calls.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from types import ModuleType

# (message regex, the module that issues it)
LIBRARY_WARNINGS = [
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    (r"Your `IterableDataset` has `__len__` defined", r"lightning\.pytorch\.utilities\.data"),
    (r"You're resuming from a checkpoint that ended before the epoch ended", r"lightning\.pytorch\..*"),
    # our main() hands LightningCLI the arguments after composing the config files (cli.composed)
    (r"LightningCLI's args parameter is intended to run from within Python", r"lightning\.pytorch\.cli"),
]
# (logger, message substring) of informational log lines
LIBRARY_LOG_LINES = [("lightning.pytorch.utilities.rank_zero", "litlogger")]


def learn2learn() -> ModuleType:
    """The learn2learn package, imported without gym's deprecation banner (any error still propagates)."""
    with contextlib.redirect_stderr(io.StringIO()):
        import learn2learn as l2l
    return l2l


class _DropLines(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_library_notices() -> None:
    """Ignore LIBRARY_WARNINGS and drop LIBRARY_LOG_LINES, each matched by message and source (idempotent)."""
    for message, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name, text in LIBRARY_LOG_LINES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) and f.text == text for f in log.filters):
            log.addFilter(_DropLines(text))
