"""Every kind of choice the project offers, each declared once with what it needs to be described and built:
the datasets (``datasets``), the paper's variants and their ablation tables (``variants``), the baseline metrics
(``baselines``), the precisions, crop modes and other settings (``settings``), and the weight files they name
(``weights``).

The options (ahiq.options), the command lines' --help, docs/training.md's option table, scripts/run_ablations.py's
tables and the builders (ahiq.data.readers, ahiq.nn, ahiq.scoring.baselines, ahiq.runtime) read these
declarations, so adding a dataset, a variant or a baseline is one entry here, plus its reader or builder where it
needs new code (docs/contributing.md). No torch: ``--help`` answers without loading a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Hashable, Iterator, MutableMapping, Sequence, TypeVar


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One named choice: ``name`` as the options and command lines take it, ``summary`` what choosing it means
    (one line, Markdown)."""

    name: Hashable
    summary: str


C = TypeVar("C", bound=Choice)


class Registry(MutableMapping, Generic[C]):
    """The choices of one kind by name, in their declared order; the first is the default."""

    def __init__(self, kind: str, choices: Sequence[C]):
        self.kind = kind
        self._choices = {choice.name: choice for choice in choices}
        if len(self._choices) != len(choices):
            raise ValueError(f"{kind}: a name is declared twice")

    def __getitem__(self, name) -> C:
        return self._choices[name]

    def __iter__(self) -> Iterator:
        return iter(self._choices)

    def __len__(self) -> int:
        return len(self._choices)

    def __setitem__(self, name, choice: C) -> None:
        """Register ``choice`` (a plug-in's, or a test's), or replace the choice of its name."""
        if choice.name != name:
            raise ValueError(f"{self.kind}: {choice.name!r} registered as {name!r}")
        self._choices[name] = choice

    def __delitem__(self, name) -> None:
        del self._choices[name]

    @property
    def names(self) -> tuple:
        return tuple(self._choices)

    @property
    def default(self) -> C:
        return next(iter(self._choices.values()))

    def choice(self, name, what: str | None = None) -> C:
        """The choice ``name``, or a ValueError naming ``what`` was given (an option, a flag, an argument) and
        every known name."""
        if name in self._choices and not isinstance(name, bool):
            return self._choices[name]
        raise ValueError(f"{what or self.kind} must be one of {', '.join(map(shown, self.names))}, got {name!r}")

    def listed(self) -> str:
        """The names, for an option's meaning: ``a``, ``b``, ..."""
        return ", ".join(f"`{shown(name)}`" for name in self._choices)

    def described(self) -> str:
        """Each name with its summary, for an option's meaning: ``a`` (what a means), ``b`` (...)."""
        return ", ".join(f"`{shown(name)}` ({choice.summary})" for name, choice in self._choices.items())


def named(kind: str, summaries: dict) -> Registry[Choice]:
    """A registry of plain choices: name -> summary, the first the default."""
    return Registry(kind, [Choice(name=name, summary=summary) for name, summary in summaries.items()])


def shown(name) -> str:
    """A name as the option files write it (None: null)."""
    return "null" if name is None else str(name)
