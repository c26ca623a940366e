"""The prompt stream of a training run: a seeded order per epoch, a resumable position, exactly-once accounting.

A prompt is *issued* when the dispatcher hands it to a rollout actor and *consumed* when the learner has trained on
its group. Prompts handed back (a removed or dead actor) are re-issued before new ones, so every prompt of an epoch is
trained on exactly once. The checkpointed state is the set of consumed prompts of the current epoch plus the epoch
number; on resume, issued-but-unconsumed prompts are simply issued again.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptItem:
    """One question scheduled for rollout: its stable index in the dataset and the epoch it belongs to."""

    index: int
    epoch: int


class PromptStream:
    """Seeded epoch-by-epoch order over `num_prompts` questions with requeue and a resumable position."""

    def __init__(self, num_prompts: int, epochs: int, seed: int) -> None:
        if num_prompts <= 0:
            raise ValueError("the training set is empty")
        self.num_prompts = num_prompts
        self.epochs = epochs
        self.seed = seed
        self.epoch = 0
        self._order: list[int] = self._epoch_order(0)
        self._cursor = 0
        self._requeued: deque[PromptItem] = deque()
        self._issued: set[int] = set()
        self._consumed: set[int] = set()

    def _epoch_order(self, epoch: int) -> list[int]:
        """The permutation of epoch `epoch`; a function of (seed, epoch) only, so resume reproduces it."""
        order = list(range(self.num_prompts))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _advance_epoch_if_done(self) -> None:
        if len(self._consumed) == self.num_prompts and self.epoch + 1 < self.epochs:
            self.epoch += 1
            self._order = self._epoch_order(self.epoch)
            self._cursor = 0
            self._issued.clear()
            self._consumed.clear()

    def next(self) -> PromptItem | None:
        """The next prompt to issue (requeued first), or None when the current epoch has nothing left to issue."""
        self._advance_epoch_if_done()
        if self._requeued:
            item = self._requeued.popleft()
            self._issued.add(item.index)
            return item
        while self._cursor < len(self._order):
            index = self._order[self._cursor]
            self._cursor += 1
            if index not in self._consumed and index not in self._issued:
                self._issued.add(index)
                return PromptItem(index, self.epoch)
        return None

    def requeue(self, item: PromptItem) -> None:
        """Hand back an issued prompt that was not trained on (actor removed or dead); it is issued again first.
        Idempotent: only an outstanding prompt can be handed back, so reporting one loss twice changes nothing."""
        if item.epoch != self.epoch or item.index not in self._issued:
            return
        self._issued.discard(item.index)
        self._requeued.append(item)

    def consume(self, item: PromptItem) -> None:
        """Record that the learner trained on this prompt's group."""
        if item.epoch == self.epoch:
            self._issued.discard(item.index)
            self._consumed.add(item.index)

    @property
    def finished(self) -> bool:
        """True when the last epoch has been consumed entirely."""
        return self.epoch == self.epochs - 1 and len(self._consumed) == self.num_prompts

    @property
    def consumed_in_epoch(self) -> int:
        """Prompts of the current epoch already trained on."""
        return len(self._consumed)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: epoch and consumed prompts (issued-but-unconsumed ones are re-issued on resume)."""
        return {"epoch": self.epoch, "consumed": sorted(self._consumed), "seed": self.seed,
                "num_prompts": self.num_prompts, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position written by state_dict; refuses a different dataset size or seed."""
        if state["num_prompts"] != self.num_prompts or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint data position is for {state['num_prompts']} prompts / seed {state['seed']}, "
                f"this run has {self.num_prompts} / {self.seed}"
            )
        self.epoch = int(state["epoch"])
        self._order = self._epoch_order(self.epoch)
        self._cursor = 0
        self._requeued.clear()
        self._issued.clear()
        self._consumed = set(int(i) for i in state["consumed"])
