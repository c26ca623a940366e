"""The prompt stream of a training run: a seeded order per epoch, a resumable position, exactly-once accounting.

A prompt is *issued* when the dispatcher hands it to a rollout actor and *consumed* when the learner has trained on
its group. Prompts handed back (a removed or dead actor) are re-issued before new ones, so every prompt of an epoch is
trained on exactly once. The checkpointed state is the set of consumed prompts of the current epoch plus the epoch
number; on resume, issued-but-unconsumed prompts are simply issued again.

With `drop_last` (trainer.drop_last, the reference's DataLoader: ReCall branch re-search,
src/verl/trainer/ppo/ray_trainer.py:482-486) an epoch is the first num_prompts - num_prompts % batch_size prompts of
its shuffled order, so every batch is full and the few left over (different ones each epoch) are not trained on in
that epoch. The cut is a function of (seed, epoch, sizes), so a resumed stream cuts the same prompts.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.config import JobConfig


@dataclass(frozen=True)
class PromptItem:
    """One question scheduled for rollout: its stable index in the dataset and the epoch it belongs to."""

    index: int
    epoch: int


def epoch_size(num_prompts: int, batch_size: int, drop_last: bool) -> int:
    """Prompts an epoch trains on: all, or with drop_last only those that fill whole batches (the reference)."""
    return num_prompts - num_prompts % batch_size if drop_last else num_prompts


class PromptStream:
    """Seeded epoch-by-epoch order over `num_prompts` questions with requeue and a resumable position."""

    def __init__(self, num_prompts: int, epochs: int, seed: int, *, batch_size: int = 1,
                 drop_last: bool = False) -> None:
        if num_prompts <= 0:
            raise ValueError("the training set is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.num_prompts = num_prompts
        self.epochs = epochs
        self.seed = seed
        self.epoch_size = epoch_size(num_prompts, batch_size, drop_last)
        """Prompts trained on per epoch: all of them, or only those that fill whole batches with drop_last."""
        if self.epoch_size == 0:
            raise ValueError(f"{num_prompts} training prompts fill no batch of {batch_size} and trainer.drop_last "
                             "drops the partial one: lower trainer.batch_size or set trainer.drop_last=false")
        self.epoch = 0
        self._order: list[int] = self._epoch_order(0)
        self._cursor = 0
        self._requeued: deque[PromptItem] = deque()
        self._issued: set[int] = set()
        self._consumed: set[int] = set()

    @classmethod
    def for_job(cls, num_prompts: int, config: JobConfig) -> PromptStream:
        """The stream of a training job: its epochs, seed, batch size and trainer.drop_last."""
        trainer = config.trainer
        return cls(num_prompts, trainer.epochs, config.seed, batch_size=trainer.batch_size,
                   drop_last=trainer.drop_last)

    def _epoch_order(self, epoch: int) -> list[int]:
        """The prompts of epoch `epoch` in order: a function of (seed, epoch, epoch_size) only, so resume reproduces it."""
        order = list(range(self.num_prompts))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[: self.epoch_size]

    def _advance_epoch_if_done(self) -> None:
        if len(self._consumed) == self.epoch_size and self.epoch + 1 < self.epochs:
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

    def can_issue(self) -> bool:
        """Whether `next` would return a prompt now (without issuing it): one handed back, one left in this epoch's
        order, or a new epoch once this one is all consumed."""
        if self._requeued or (len(self._consumed) == self.epoch_size and self.epoch + 1 < self.epochs):
            return True
        return any(i not in self._consumed and i not in self._issued for i in self._order[self._cursor:])

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
        return self.epoch == self.epochs - 1 and len(self._consumed) == self.epoch_size

    @property
    def consumed_in_epoch(self) -> int:
        """Prompts of the current epoch already trained on."""
        return len(self._consumed)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: epoch and consumed prompts (issued-but-unconsumed ones are re-issued on resume)."""
        return {"epoch": self.epoch, "consumed": sorted(self._consumed), "seed": self.seed,
                "num_prompts": self.num_prompts, "epochs": self.epochs, "epoch_size": self.epoch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position written by state_dict; refuses a different dataset size, seed or epoch size."""
        if state["num_prompts"] != self.num_prompts or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint data position is for {state['num_prompts']} prompts / seed {state['seed']}, "
                f"this run has {self.num_prompts} / {self.seed}"
            )
        # Positions saved before drop_last existed trained every prompt of an epoch.
        saved_size = int(state.get("epoch_size", state["num_prompts"]))
        if saved_size != self.epoch_size:
            raise ValueError(
                f"checkpoint data position trains {saved_size} prompts per epoch, this run {self.epoch_size} "
                "(trainer.batch_size or trainer.drop_last changed): resume with the settings of the checkpoint"
            )
        self.epoch = int(state["epoch"])
        self._order = self._epoch_order(self.epoch)
        self._cursor = 0
        self._requeued.clear()
        self._issued.clear()
        self._consumed = set(int(i) for i in state["consumed"])
