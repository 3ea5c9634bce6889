"""Where a Speculator's proposals come from (spec_policy.py): the DraftSource protocol, and
`InProcess`, a Drafter (spec_decode.py) run in the decode step thread. A drafter in a process
of its own is backends/draft/client.py's RemoteDrafter."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from backends.core.sequence import Sequence
from backends.core.spec_decode import Drafter, KeyedDrafts


@runtime_checkable
class DraftSource(Protocol):
    """Where a Speculator's proposals come from, per sequence."""

    def draft(self, seq: Sequence, k: int) -> list[int]:
        """Up to k tokens to follow `seq` as it is now ([]: none ready)."""
        ...

    def update(self, seqs: Iterable[Sequence]) -> None:
        """These sequences have new tokens (or are new)."""
        ...

    def forget(self, req_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class InProcess:
    """A Drafter run in the step thread, from the sequence's whole history. `scored`: the
    drafter scores its drafts (`propose_scored`, e.g. NgramDrafter), and so does
    `draft_scored` (a DraftSource may have these two; the Speculator asks)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self._drafts = KeyedDrafts(drafter)
        self.scored = self._drafts.scored
        self._done = getattr(drafter, "done", None)      # told each sequence's tokens as it leaves
        self._live: dict[str, Sequence] = {}

    def calibrate(self, k: int, clock) -> list[tuple[int, float, int]]:
        """The drafter's timed calibration calls where it has them (a draft model), else none."""
        calibrate = getattr(self.drafter, "calibrate", None)
        return calibrate(k, clock) if calibrate is not None else []

    def draft(self, seq: Sequence, k: int) -> list[int]:
        return self.drafter.propose(seq.all_ids, k)

    def draft_many(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        """`draft` for several sequences, batched where the drafter can (a draft model)."""
        return [d for d, _ in self._drafts.propose_many([s.req_id for s in seqs], [s.all_ids for s in seqs], k)]

    def draft_scored(self, seq: Sequence, k: int) -> tuple[list[int], int]:
        """(draft, its score); score 0 from a drafter that does not score."""
        return self._drafts.propose(seq.req_id, seq.all_ids, k)

    def update(self, seqs: Iterable[Sequence]) -> None:
        if self._done is not None:
            for seq in seqs:
                self._live[seq.req_id] = seq

    def forget(self, req_id: str) -> None:
        self._drafts.forget(req_id)
        if (seq := self._live.pop(req_id, None)) is not None:
            self._done(seq.all_ids)

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass
