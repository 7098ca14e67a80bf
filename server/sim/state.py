"""What the simulated phone holds between requests: the live state and the checkpoint slots.

Session protocol v1.1 (device-protocol.md section 3) pins the live state: after ``done`` with
reason ``stop`` or ``length`` it is the start state (empty, the previous state, or a slot's) + the
prompt + every id sent as ``tok``. After a cancel or an error it is *undefined*; the simulator makes
it visibly wrong (:meth:`PhoneState.poison`: the tokens processed so far plus one random token), so a
host that continues from it anyway gets output unlike anything it could expect, and a host that
checks ``start.state_tokens`` sees one token too many.

Slots (``checkpoints`` of them, numbered from 0) are copies of the state at a token count chosen by
the host (``save``), started from later (``restore``). They live in process memory only: a restart
empties them; cancels and request errors leave them alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from server.sim.vocab import SPECIAL_START_ID

MAX_SAVES = 2  # per request (the contract's limit)


class BadCheckpoint(ValueError):
    """A ``restore`` or ``save`` the runtime cannot do (answered with ``bad_request``)."""


@dataclass(frozen=True, slots=True)
class Save:
    """Copy the state into ``slot`` when it holds exactly ``at`` tokens (``saved`` reports the same)."""

    slot: int
    at: int


class PhoneState:
    """The live state (token ids, as the conv/SSM/KV state would hold them) and the slots."""

    def __init__(self, checkpoints: int = 0) -> None:
        self.live: list[int] = []
        self._slots: list[list[int] | None] = [None] * checkpoints
        self._junk = random.Random()  # poison is deliberately not reproducible

    @property
    def checkpoints(self) -> int:
        """Number of slots (0: a v1 runtime)."""
        return len(self._slots)

    def slot(self, index: int) -> list[int] | None:
        """A copy of what slot ``index`` holds (None when empty); raises on an unknown slot."""
        self._check_slot(index, "restore")
        held = self._slots[index]
        return None if held is None else list(held)

    def start(self, *, reset: bool, restore: int | None) -> list[int]:
        """A copy of the state a request starts from; ``restore`` has precedence over ``reset``."""
        if restore is not None:
            held = self.slot(restore)
            if held is None:
                raise BadCheckpoint(f"restore: slot {restore} is empty")
            return held
        return [] if reset else list(self.live)

    def check_saves(self, saves: Sequence[Save], held: int, prompt_tokens: int) -> None:
        """Each save must name a slot and fall inside the prompt: ``held < at <= held + prompt``."""
        if len(saves) > MAX_SAVES:
            raise BadCheckpoint(f"save: at most {MAX_SAVES} per request, got {len(saves)}")
        for save in saves:
            self._check_slot(save.slot, "save")
            if not held < save.at <= held + prompt_tokens:
                raise BadCheckpoint(
                    f"save: at {save.at} is outside the prompt (the state holds {held} tokens before it "
                    f"and {held + prompt_tokens} after it)")

    def save(self, slot: int, tokens: Sequence[int]) -> None:
        """Replace what ``slot`` holds with a copy of ``tokens``."""
        self._slots[slot] = list(tokens)

    def poison(self, processed: Sequence[int]) -> None:
        """The live state becomes undefined: ``processed`` then one random (ordinary) token."""
        self.live = [*processed, self._junk.randrange(SPECIAL_START_ID)]

    def _check_slot(self, index: int, what: str) -> None:
        if not 0 <= index < len(self._slots):
            slots = f"slots are 0..{len(self._slots) - 1}" if self._slots else "no checkpoint slots"
            raise BadCheckpoint(f"{what}: unknown slot {index} ({slots})")
