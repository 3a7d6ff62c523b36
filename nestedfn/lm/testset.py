"""The test split (mlx-lm's ``--test``): the mean token loss of saved adapters on test.jsonl.

After training, ``train`` evaluates ``test.jsonl`` itself (``test: true``); this module is the
other half of mlx-lm's ``--test``: ``train: false`` evaluates the adapters already in a run
directory (loaded by ``mlx_lm.load(model, adapter_path=...)``, as mlx-lm does) without
training.  The loss is the one training reports: ``Σ mask·CE / Σ mask`` over the first
``test_batches`` batches (-1: all), prompts masked when ``mask_prompt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nestedfn.lm.errors import RunError

__all__ = ["test_adapters"]


def test_adapters(config: Any, adapter_path: str | Path) -> float:
    """The test loss of the adapters in ``adapter_path`` on ``config.data``/test.jsonl."""
    from nestedfn.lm.data import DataError, load_dataset
    from nestedfn.lm.evaluate import evaluate
    from nestedfn.lm.loss import masked_cross_entropy
    from nestedfn.lm.prepare import features, load_run_model

    adapter_path = Path(adapter_path).absolute()
    if not (adapter_path / "adapter_config.json").is_file():
        raise RunError(f"no adapters to test in {adapter_path} (adapter_config.json missing)")
    if not config.data:
        raise RunError("no data given: pass --data DIR (with test.jsonl)")
    model, tokenizer = load_run_model(config.model, config.trust_remote_code, adapter_path)
    try:
        test_set = load_dataset(
            config.data, "test", tokenizer, config.max_seq_len, config.mask_prompt, features(config)
        )
    except DataError as e:
        raise RunError(str(e)) from None
    model.train(False)

    def eval_fn(_params: Any, inputs: Any, targets: Any, mask: Any) -> Any:
        return masked_cross_entropy(model(inputs), targets, mask)

    return evaluate(eval_fn, None, test_set, config, config.test_batches)
