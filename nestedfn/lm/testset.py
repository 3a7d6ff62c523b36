"""The test split (mlx-lm's ``--test``): the test loss of saved adapters on test.jsonl.

After training, ``train`` evaluates ``test.jsonl`` itself (``test: true``); this module is the
other half of mlx-lm's ``--test``: ``train: false`` evaluates the adapters already in a
directory (nestedfn's run or one ``mlx_lm lora`` wrote, loaded by ``mlx_lm.load(model,
adapter_path=...)`` as mlx-lm does; an empty path: the base model) without training.  The
loss and the batches are mlx-lm's (``nestedfn.lm.loss``, ``nestedfn.lm.batches``): the first
``test_batches`` batches (-1: all) in the order mlx-lm's seeded generator draws first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nestedfn.lm.batches import BatchPlan, batches_in_order, split_batches
from nestedfn.lm.data import DataError, load_dataset
from nestedfn.lm.errors import RunError
from nestedfn.lm.loss import evaluate_batches, loss_fn
from nestedfn.lm.prepare import features, load_run_model
from nestedfn.run import distributed

__all__ = ["test_adapters"]


def test_adapters(config: Any, adapter_path: str | Path) -> float:
    """The test loss of the adapters in ``adapter_path`` (``""``: none) on
    ``config.data``/test.jsonl."""
    adapters = Path(adapter_path).absolute() if str(adapter_path) else None
    if adapters is not None and not (adapters / "adapter_config.json").is_file():
        raise RunError(f"no adapters to test in {adapters} (adapter_config.json missing)")
    if not config.data:
        raise RunError("no data given: pass --data DIR (with test.jsonl)")
    model, tokenizer = load_run_model(config.model, config.trust_remote_code, adapters)
    try:
        test_set = load_dataset(
            config.data, "test", tokenizer, config.max_seq_len, config.mask_prompt, features(config)
        )
    except DataError as e:
        raise RunError(str(e)) from None
    rank, world = distributed.rank(), distributed.world_size()
    batches = split_batches(test_set, config.batch_size, rank, world)
    order = BatchPlan.test_only(config.seed, len(batches))
    given = batches_in_order(test_set, batches, order, config.max_seq_len)
    return evaluate_batches(model, None, given, config.test_batches, loss_fn(config.pad_target))
