"""A registry of named records, one per value of a flag (``--data_type``, ``--objective``): the trainer's
choices, help and dispatch come from it, so a plug-in adds a record and edits nothing else."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


R = TypeVar("R", bound=Named)


class Records(Mapping[str, R], Generic[R]):
    """Records by name; looking up an unknown name is a one-line error naming the flag and the choices."""

    def __init__(self, flag: str):
        self.flag = flag
        self._records: dict[str, R] = {}

    def register(self, record: R) -> R:
        """Add a record; registering a name twice is an error unless it is the same record."""
        if self._records.get(record.name, record) is not record:
            raise ValueError(f"{self.flag} {record.name}: already registered")
        self._records[record.name] = record
        return record

    def __getitem__(self, name: str) -> R:
        if name not in self._records:
            raise ValueError(f"{self.flag} {name!r}: expected one of {'|'.join(self._records)}")
        return self._records[name]

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)
