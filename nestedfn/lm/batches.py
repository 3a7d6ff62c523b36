"""mlx-lm's batches, replayed as a pure function of the step.

``mlx_lm lora`` seeds NumPy's global generator once (``np.random.seed(seed)``) and then
``mlx_lm.tuner.trainer.iterate_batches`` does, per split: sort the examples by
``CacheDataset.itemlen`` -- the ``len`` of the raw JSON record, its number of keys, so for a
file of one format the file's order -- cut the sorted list into batches of ``batch_size``
consecutive examples (the last ``n % batch_size`` are left out; fewer examples than
``batch_size`` is an error), and visit the
batches in the order of ``np.random.permutation``, a new one each epoch.  Evaluations draw
from the same generator: one permutation of the split's batches per evaluation, of which the
first ``val_batches`` are taken.  So which batch a step trains on depends on every draw before
it, in this order: at iteration ``it`` (1-based), the train permutation when ``it`` starts an
epoch, then the valid permutation when ``it`` evaluates (``it == 1``, ``it % steps_per_eval ==
0`` or ``it == iters``: before the step, on the parameters after ``it - 1`` steps); after the
last iteration, the test permutation.

``BatchPlan`` replays those draws with ``np.random.RandomState(seed)`` (the generator
``np.random.seed`` seeds) when a run starts, so a step's batch is a function of the step
(``--resume`` continues the same sequence) and NumPy's global generator is left alone.  Each
batch's array is made by mlx-lm's own ``iterate_batches`` (its padding to ``1 + 32k``, its
truncation, its ``(batch, lengths)`` layout), given that batch's examples.  With ``world``
processes, rank ``r`` takes the examples ``r, r + world, ...`` of each batch, as mlx-lm's
``comm_group`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.trainer import iterate_batches

from nestedfn.lm.errors import RunError
from nestedfn.run import distributed

__all__ = ["BatchPlan", "RunBatches", "batches_in_order", "eval_due", "make_batch", "split_batches"]

Batch = tuple[mx.array, mx.array]  # mlx-lm's (tokens [B, L], (offset, length) [B, 2])


def split_batches(dataset: Any, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Rank ``rank``'s example indices of each of mlx-lm's batches of ``dataset`` (a
    ``TokenDataset``), in mlx-lm's order (by record size, then file order).  Fewer examples than ``batch_size`` is a ``RunError``
    naming the file (mlx-lm refuses it too: a batch would repeat examples)."""
    n = len(dataset)
    if n < batch_size:
        raise RunError(
            f"{dataset.path}: {n} example(s), fewer than batch_size {batch_size} (mlx-lm "
            "refuses this too); lower batch_size or add examples"
        )
    idx = sorted(range(n), key=lambda i: dataset.record_sizes[i])
    return [
        idx[i + rank : i + rank + batch_size : world]
        for i in range(0, n - batch_size + 1, batch_size)
    ]


def eval_due(done: int, steps: int, eval_every: int) -> bool:
    """Whether mlx-lm evaluates after ``done`` completed steps of ``steps``: before iteration
    ``done + 1`` when that is the first, a multiple of ``eval_every`` or the last (0: never,
    nestedfn's)."""
    if not eval_every or done >= steps:
        return False
    it = done + 1
    return it == 1 or it % eval_every == 0 or it == steps


@dataclass(frozen=True)
class BatchPlan:
    """The batch order of one run: ``train[i]`` is the batch number of step ``i + 1`` (0-based
    ``i``), ``valid[done]`` the valid batches' order of the evaluation after ``done`` steps,
    ``test`` the test batches' order after training (``None`` without a test split)."""

    train: np.ndarray
    valid: dict[int, np.ndarray] = field(default_factory=dict)
    test: np.ndarray | None = None

    @staticmethod
    def replay(
        seed: int,
        steps: int,
        n_train: int,
        n_valid: int,
        eval_every: int,
        n_test: int | None = None,
    ) -> BatchPlan:
        """mlx-lm's draws for a run of ``steps`` steps over ``n_train`` train batches,
        evaluating ``n_valid`` valid batches every ``eval_every`` steps (see the module
        docstring for the order)."""
        rng = np.random.RandomState(seed)
        train: list[np.ndarray] = []
        valid: dict[int, np.ndarray] = {}
        for done in range(steps):
            if done % n_train == 0:
                train.append(rng.permutation(n_train))
            if n_valid and eval_due(done, steps, eval_every):
                valid[done] = rng.permutation(n_valid)
        test = rng.permutation(n_test) if n_test else None
        order = np.concatenate(train) if train else np.zeros(0, np.int64)
        return BatchPlan(order, valid, test)

    @staticmethod
    def test_only(seed: int, n_test: int) -> np.ndarray:
        """The test batches' order of mlx-lm's ``--test`` without ``--train``."""
        return np.random.RandomState(seed).permutation(n_test)


def make_batch(dataset: Any, examples: list[int], max_seq_len: int) -> Batch:
    """mlx-lm's ``(batch, lengths)`` of ``dataset``'s ``examples`` (in that order), made by
    ``iterate_batches`` itself."""
    items = [(dataset.tokens[i], dataset.offsets[i]) for i in examples]
    return next(iterate_batches(items, len(items), max_seq_len))


def batches_in_order(
    dataset: Any, batches: list[list[int]], order: np.ndarray, max_seq_len: int
) -> Iterator[Batch]:
    """The batches of ``dataset`` in ``order``, made one at a time as they are taken."""
    for k in order:
        yield make_batch(dataset, batches[int(k)], max_seq_len)


@dataclass(frozen=True)
class RunBatches:
    """Every batch of one run on this rank: the splits' batches and the plan's order."""

    train_set: Any
    valid_set: Any
    test_set: Any
    train_batches: list[list[int]]
    valid_batches: list[list[int]]
    test_batches: list[list[int]] | None
    plan: BatchPlan
    max_seq_len: int

    @staticmethod
    def for_run(config: Any, train_set: Any, valid_set: Any, test_set: Any = None) -> RunBatches:
        """The batches of a run of ``config`` (``batch_size``, ``seed``, ``steps``,
        ``eval_every``, ``test``) on this process's rank; a split smaller than ``batch_size``
        is a ``RunError`` before anything runs."""
        rank, world = distributed.rank(), distributed.world_size()
        bs = config.batch_size
        train_b = split_batches(train_set, bs, rank, world)
        valid_b = split_batches(valid_set, bs, rank, world)
        test_b = split_batches(test_set, bs, rank, world) if config.test else None
        plan = BatchPlan.replay(
            config.seed,
            config.steps,
            len(train_b),
            len(valid_b),
            config.eval_every,
            len(test_b) if test_b else None,
        )
        return RunBatches(
            train_set, valid_set, test_set, train_b, valid_b, test_b, plan, config.max_seq_len
        )

    def train(self, done: int) -> Batch:
        """The batch of step ``done + 1``."""
        examples = self.train_batches[int(self.plan.train[done])]
        return make_batch(self.train_set, examples, self.max_seq_len)

    def valid(self, done: int) -> Iterator[Batch]:
        """The valid batches of the evaluation after ``done`` steps, in mlx-lm's order (an
        evaluation outside mlx-lm's points takes them in file order)."""
        order = self.plan.valid.get(done, np.arange(len(self.valid_batches)))
        return batches_in_order(self.valid_set, self.valid_batches, order, self.max_seq_len)

    def test(self) -> Iterator[Batch]:
        """The test batches after training, in mlx-lm's order."""
        assert self.test_batches is not None and self.plan.test is not None
        return batches_in_order(self.test_set, self.test_batches, self.plan.test, self.max_seq_len)
