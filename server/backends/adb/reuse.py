"""State reuse on one phone, the pure part: what its state holds, where a request starts, where it saves.

No I/O: the session (session.py) asks a :class:`Tracker` for a :class:`Plan`, sends it as the
``generate`` op, and reports back what the phone said. docs/state-reuse.md tells the rules; in short:

* **What the phone holds** (device-protocol.md section 3, v1.1): the exact ids of its live state (None:
  undefined, after a cancel, an error, or while a request runs), and those of each checkpoint slot
  (None: empty or unknown). Only what the phone confirmed counts: a slot is filled from ``done.saved``.
* **The start point** of a request for prompt P is the longest of: the live state (continue,
  ``reset: false``), a slot (``restore``), nothing (``reset: true``); only the rest of P is sent. A
  state *matches* P when it is an id-prefix of P, or when its text is exactly the text of P's first k
  tokens (text-identical: the phone generated ``" Hello"`` + ``" world"`` where the prompt re-renders
  ``" Hello world"`` differently, or the other way round; a special token counts as itself, not as the
  characters that spell it). Then the phone runs the state + P[k:]:
  the same text, P's own ids after the match, so a valid tokenization of the prompt. At least one
  prompt token is always sent: a state holds no logits to sample from, and recurrent state cannot be
  cut back to recompute the last token.
* **Saves**: at most 2 per request, at the request's boundaries past the start point (shared ones
  first, then the latest); a boundary at the very end of P is saved one token earlier (see above:
  the same prompt again can then restore it). A boundary a slot already holds is not saved again.
* **Slot replacement** (a prefix tree of saved states, valued by use): an empty slot first; then a
  conversation's slot that the new save extends (superseded by the conversation's later boundary);
  then, least recently used first, the leaves (a conversation's latest boundary: used when saved or
  restored) and the shared prefixes (a system/tools block: used when saved or when a *new*
  conversation starts from it); a slot that other slots extend without being shared goes last.
  A shared prefix is thus kept while new conversations keep coming, and gives way when the phone's
  slots are all needed by conversations that come back (a request that restores the shared prefix
  only because its own slot was evicted does not count as a use of it).
* **No thrashing**: when more conversations come back to a phone than it has slots, least recently
  used replacement would evict exactly the conversation that comes next, every time (0 % reuse). A
  request that lost its slot (its prompt extends a state the phone held before a save replaced it,
  remembered as a *ghost*, the last :data:`GHOSTS`) may therefore only replace slots unused since its
  own was last used, and not used within the last ``4 * (len(slots) + 1)`` requests (a shared prefix:
  within the last ``len(slots)``): the conversations that kept their slots keep hitting, the others start from
  the shared prefix, until it gives way to them, and a slot left by a conversation that ended is
  reclaimed.
* **Proven conversations**: that protection is for states that have shown they are reused: a leaf is
  *proven* once restored (or held already by a request's boundary), or when a request that resumed
  its conversation (restored its own state, continued the live one, or came back to a ghost) saved
  it; a state a new conversation saved and nobody reused yet is not. A request whose conversation has
  proven itself (its ghost was proven, or it comes back a second time without a slot) may replace an
  unproven leaf however recent: a conversation that keeps coming back is not locked out by one-shot
  requests that keep saving states nobody reuses (segmented LRU's probation; before, one such gap
  locked it out until its ghost was forgotten, 32 replacements later).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from server.backends.base import Boundary

MAX_SAVES = 2  # per request (device-protocol.md: `save` holds at most 2)
GHOSTS = 32  # replaced states remembered per phone ("No thrashing")

# a token's raw bytes; None for a special token: it matches only itself, never the text that spells it
# (``<|im_end|>`` written as ordinary tokens is other input to the model than the special token)
TokenBytes = Callable[[int], bytes | None]
Ids = tuple[int, ...]


@dataclass(slots=True)
class Slot:
    """What a checkpoint slot holds, as the host knows it."""

    ids: Ids
    shared: bool = False  # saved at a shared boundary (a system/tools block)
    # the tracker's clock when last saved or restored (for a shared slot: restored by a new conversation)
    used: int = 0
    proven: bool = False  # a leaf reused, or saved by a request that resumed its conversation ("Proven")


@dataclass(frozen=True, slots=True)
class Start:
    """Where a request starts: the state holds ``held`` before the ids sent, and ``held`` stands for
    the prompt's first ``covered`` tokens (the same text; the same ids unless text-identical)."""

    reset: bool  # the `reset` field of the op (true also for a restore: restore takes precedence)
    restore: int | None = None
    held: Ids = ()
    covered: int = 0

    @property
    def kind(self) -> str:
        """``reset``, ``continue`` or ``restore`` (for logs and tests)."""
        if self.restore is not None:
            return "restore"
        return "reset" if self.reset else "continue"


RESET = Start(reset=True)


@dataclass(frozen=True, slots=True)
class Save:
    """Save the state into ``slot`` when it holds ``at`` tokens (the op's ``{"slot", "at"}``); the
    slot then holds ``ids``."""

    slot: int
    at: int
    ids: Ids
    shared: bool = False
    proven: bool = False  # the slot starts proven (a leaf saved by a request that resumed its conversation)


@dataclass(frozen=True, slots=True)
class Plan:
    """One request as sent: its start point, the ids sent (the prompt after ``start.covered``), saves.

    ``known`` is False only for a raw continuation (``GenerationParams.reset`` false) from a state
    the host does not know: then nothing is checked and nothing is known afterwards."""

    start: Start
    send: list[int]
    saves: list[Save] = field(default_factory=list)
    touch: list[int] = field(default_factory=list)  # slots that already hold a boundary of the request
    known: bool = True
    # the ghosts the prompt extends: states this phone held until a save replaced them ("No thrashing")
    lost: tuple[Ids, ...] = ()

    @property
    def returning(self) -> bool:
        """The request lost its slot to others (its prompt extends a ghost)."""
        return bool(self.lost)

    @property
    def cached(self) -> int:
        """Prompt tokens not processed again (``Started.cached_tokens``)."""
        return self.start.covered

    @property
    def state_tokens(self) -> int:
        """What ``start.state_tokens`` must say."""
        return len(self.start.held)


@dataclass(frozen=True, slots=True)
class Holding:
    """What a phone holds, as its health reports it."""

    state_tokens: int | None = None  # the live state's length (None: undefined or unknown)
    slots: int = 0  # checkpoint slots of its runtime (0: none)
    used: int = 0  # slots holding a known checkpoint


# --------------------------------------------------------------------------- matching


def match(held: Sequence[int], prompt: Sequence[int], text: TokenBytes | None) -> int | None:
    """How many of the prompt's tokens ``held`` stands for, or None when it is not a prefix of the
    prompt: an id-prefix, or (with ``text``) text-identical to the prompt's first k tokens. Always
    leaves at least one prompt token to send (k < len(prompt))."""
    n = len(held)
    if n == 0:
        return None
    c = 0  # common id-prefix
    limit = min(n, len(prompt))
    while c < limit and held[c] == prompt[c]:
        c += 1
    if c == n:
        return n if n < len(prompt) else None
    if text is None:
        return None
    # the texts agree up to token c: compare the rest byte by byte, a token at a time on each side; a
    # special token only against the same special token, both sides at a token boundary
    i, j = c, c
    h = p = b""
    while True:
        if not h and not p and i < n and j < len(prompt) and (text(held[i]) is None or text(prompt[j]) is None):
            if held[i] != prompt[j]:
                return None
            i, j = i + 1, j + 1
            continue
        if not h:
            if i == n:  # all of held matched: at a token boundary of the prompt?
                return j if not p and 0 < j < len(prompt) else None
            piece = text(held[i])
            if piece is None:  # a special token inside one of the prompt's tokens
                return None
            h, i = piece, i + 1
            continue
        if not p:
            if j == len(prompt):
                return None
            piece = text(prompt[j])
            if piece is None:
                return None
            p, j = piece, j + 1
            continue
        m = min(len(h), len(p))
        if h[:m] != p[:m]:
            return None
        h, p = h[m:], p[m:]


def is_prefix(short: Sequence[int], long: Sequence[int]) -> bool:
    """``short`` is a strict id-prefix of ``long``."""
    return len(short) < len(long) and list(long[: len(short)]) == list(short)


def plan_start(
    prompt: Sequence[int],
    live: Ids | None,
    slots: Sequence[Slot | None],
    *,
    text: TokenBytes | None = None,
    max_state: int | None = None,
) -> Start:
    """The longest start point (see the module docstring); ties go to the live state (no restore),
    then to the shorter state. A text-identical state longer than the prompt tokens it stands for is
    used only while the state stays within ``max_state`` tokens (the context minus the tokens to
    generate), so that reuse never leaves less room to generate than a reset would."""
    best = RESET
    best_key = (0, 0, 0)

    def consider(start: Start, prefer: int) -> None:
        nonlocal best, best_key
        grows = len(start.held) - start.covered
        if grows > 0 and max_state is not None and len(prompt) + grows > max_state:
            return
        key = (start.covered, prefer, -len(start.held))
        if key > best_key:
            best, best_key = start, key

    if live is not None:
        k = match(live, prompt, text)
        if k is not None:
            consider(Start(reset=False, held=live, covered=k), 1)
    for i, slot in enumerate(slots):
        if slot is not None:
            k = match(slot.ids, prompt, text)
            if k is not None:
                consider(Start(reset=True, restore=i, held=slot.ids, covered=k), 0)
    return best


# --------------------------------------------------------------------------- saves


@dataclass(frozen=True, slots=True)
class Protect:
    """Slots a save may not replace (empty and superseded ones it always may): leaves used after
    ``leaves``, shared prefixes used after ``shared`` (clocks of the tracker); with ``proven_only``,
    of the leaves only proven ones (the request's conversation has proven itself)."""

    leaves: int
    shared: int
    proven_only: bool = False


def pick_slot(
    slots: Sequence[Slot | None], ids: Ids, exclude: Collection[int] = (), *, protect: Protect | None = None
) -> int | None:
    """The slot a save of ``ids`` replaces (see the module docstring), None if every slot is excluded
    or protected."""
    best: tuple[int, int, int] | None = None
    for i, slot in enumerate(slots):
        if i in exclude:
            continue
        if slot is None:
            tier, used = 0, 0
        elif not slot.shared and any(o is not None and is_prefix(slot.ids, o.ids) for o in slots):
            tier, used = 3, slot.used  # a node other slots extend: kept longest
        elif not slot.shared and is_prefix(slot.ids, ids):
            tier, used = 1, slot.used  # superseded by the conversation's later boundary
        elif protect is not None and slot.used > (protect.shared if slot.shared else protect.leaves) and (
                slot.shared or slot.proven or not protect.proven_only):
            continue
        else:
            tier, used = 2, slot.used  # a leaf or a shared prefix, least recently used first
        key = (tier, used, i)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def plan_saves(
    prompt: Sequence[int],
    start: Start,
    boundaries: Sequence[Boundary],
    slots: Sequence[Slot | None],
    *,
    protect: Protect | None = None,
    proven: bool = False,
) -> tuple[list[Save], list[int]]:
    """Saves for a request that starts at ``start`` (at most :data:`MAX_SAVES`, in distinct slots),
    and the slots that already hold one of its boundaries (to mark used); ``protect`` as for
    :func:`pick_slot`; ``proven``: the request resumed its conversation (its leaves start proven)."""
    if not slots or not boundaries:
        return [], []
    wanted: dict[int, bool] = {}  # prompt position -> shared
    for b in boundaries:
        at = min(b.at, len(prompt) - 1)
        if start.covered < at:
            wanted[at] = wanted.get(at, False) or b.shared
    view = list(slots)
    saves: list[Save] = []
    touch: list[int] = []
    for at in sorted(wanted, key=lambda a: (not wanted[a], -a)):
        ids = start.held + tuple(prompt[start.covered : at])
        holder = next((i for i, s in enumerate(view) if s is not None and s.ids == ids), None)
        if holder is not None:
            touch.append(holder)
            continue
        if len(saves) == MAX_SAVES:
            continue
        slot = pick_slot(view, ids, exclude={s.slot for s in saves}, protect=protect)
        if slot is None:
            continue
        save = Save(slot, len(start.held) + at - start.covered, ids, wanted[at], proven and not wanted[at])
        saves.append(save)
        view[slot] = Slot(ids, save.shared)
    saves.sort(key=lambda s: s.at)
    return saves, touch


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """What one runtime process holds, as the host knows it, and the plans made from it.

    ``slots`` is the number of checkpoint slots the runtime advertised (``ready.checkpoints``; 0: a v1
    runtime, continuation only). ``enabled`` False (``state_reuse off``): every request resets and
    nothing is saved; the live state is still tracked, for the phone's health."""

    def __init__(self, slots: int = 0, *, text: TokenBytes | None = None, enabled: bool = True) -> None:
        self.live: Ids | None = None
        self.slots: list[Slot | None] = [None] * max(0, slots)
        self.text = text
        self.enabled = enabled
        self._clock = 0
        self._replaced: dict[int, Slot | None] = {}  # what the slots a request saves to held before it
        # states the phone held in a slot until a save replaced them, with their last use and whether
        # they were proven ("No thrashing", "Proven conversations")
        self.ghosts: deque[tuple[Ids, int, bool]] = deque(maxlen=GHOSTS)

    def plan(
        self, prompt: Sequence[int], boundaries: Sequence[Boundary] = (), *, max_state: int | None = None
    ) -> Plan:
        """The start point and saves for ``prompt`` (nothing changes until :meth:`begin`)."""
        if not self.enabled:
            return Plan(RESET, list(prompt))
        start = plan_start(prompt, self.live, self.slots, text=self.text, max_state=max_state)
        lost = [(g, at, proven) for g, at, proven in self.ghosts if len(g) > start.covered and is_prefix(g, prompt)]
        protect = None
        if lost:  # see "No thrashing"
            since = max(at for _, at, _ in lost)
            protect = Protect(
                leaves=max(since, self._clock - 4 * (len(self.slots) + 1)),
                shared=max(since, self._clock - len(self.slots)),
                proven_only=any(proven for _, _, proven in lost),
            )
        view = list(self.slots)
        i = start.restore
        restored = None if i is None else view[i]
        if i is not None and restored is not None and not (restored.shared and lost):  # used now (begin())
            view[i] = Slot(restored.ids, restored.shared, self._clock + 1, restored.proven)
        resumed = bool(lost) or start.kind == "continue" or (restored is not None and not restored.shared)
        saves, touch = plan_saves(prompt, start, boundaries, view, protect=protect, proven=resumed)
        return Plan(start, list(prompt[start.covered :]), saves, touch, lost=tuple(g for g, _, _ in lost))

    def raw(self, prompt: Sequence[int]) -> Plan:
        """A raw continuation (``GenerationParams.reset`` false): ``prompt`` on top of the live state."""
        if self.live is None:
            return Plan(Start(reset=False), list(prompt), known=False)
        return Plan(Start(reset=False, held=self.live), list(prompt))

    def reusable(self, prompt: Sequence[int]) -> int:
        """Prompt tokens a request for ``prompt`` would not process again, if planned now."""
        if not self.enabled:
            return 0
        return plan_start(prompt, self.live, self.slots, text=self.text).covered

    def begin(self, plan: Plan) -> None:
        """The request was sent: the live state is in flux until it ends, so are the slots it saves to;
        the slot it restores and those holding its boundaries were used now (a shared prefix: only
        when a new conversation restores it)."""
        self._clock += 1
        self.live = None
        for i in plan.touch:
            slot = self.slots[i]
            if slot is not None and not slot.shared:
                slot.used, slot.proven = self._clock, True
        if plan.start.restore is not None:
            slot = self.slots[plan.start.restore]
            if slot is not None and not (slot.shared and plan.returning):
                slot.used, slot.proven = self._clock, not slot.shared
        if plan.lost:  # its conversation came back without a slot: the next time, it has proven itself
            self.ghosts = deque(((g, at, proven or g in plan.lost) for g, at, proven in self.ghosts), maxlen=GHOSTS)
        self._replaced = {save.slot: self.slots[save.slot] for save in plan.saves}
        for save in plan.saves:
            self.slots[save.slot] = None

    def finish(
        self, plan: Plan, generated: Sequence[int] | None, saved: Sequence[tuple[int, int]] | None
    ) -> None:
        """The request ended. ``generated``: every id the phone sent, when it ended with ``stop`` or
        ``length`` (None after a cancel or an error: the live state is undefined). ``saved``: the
        phone's ``done.saved`` as (slot, tokens), None when there was no ``done`` (an error: whether
        the planned saves were written is unknown). A slot the phone did not write keeps what it
        held; one it wrote otherwise than planned becomes unknown."""
        if generated is not None and plan.known:
            self.live = plan.start.held + tuple(plan.send) + tuple(generated)
        else:
            self.live = None
        replaced, self._replaced = self._replaced, {}
        if saved is None:
            return
        planned = {(s.slot, s.at): s for s in plan.saves}
        written = set()
        for slot, at in saved:
            if not 0 <= slot < len(self.slots):
                continue
            written.add(slot)
            save = planned.get((slot, at))
            self.slots[slot] = Slot(save.ids, save.shared, self._clock, save.proven) if save is not None else None
        for slot, old in replaced.items():
            if slot not in written and self.slots[slot] is None:
                self.slots[slot] = old
            elif old is not None and not old.shared and self.slots[slot] is not None:
                new = self.slots[slot]
                if new is not None and not is_prefix(old.ids, new.ids):
                    self.ghosts.append((old.ids, old.used, old.proven))

    def forget(self) -> None:
        """The phone does not hold what the host thought: treat it as holding nothing at all."""
        self.live = None
        self.slots = [None] * len(self.slots)
        self._replaced = {}
        self.ghosts.clear()

    def drop_checkpoints(self) -> None:
        """The runtime does not do the checkpoints it advertised: plan as for a v1 runtime from now on."""
        self.slots = []
        self._replaced = {}
        self.ghosts.clear()

    def holding(self) -> Holding:
        return Holding(
            None if self.live is None else len(self.live),
            len(self.slots),
            sum(s is not None for s in self.slots),
        )
