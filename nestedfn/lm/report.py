"""What the trainer prints while it runs: a progress bar on a terminal, plain lines otherwise.

On a terminal (``stderr`` is a tty) the tqdm bar shows the step, the loss, tokens/s, peak
memory and each tier's update count.  Anywhere else (a log file, a pipe, CI) tqdm's carriage
returns would make an unreadable file, so the trainer prints instead one line every
``steps_per_report`` steps (and at the last step), like ``mlx_lm lora``'s report lines::

    step 20/200: loss 1.234, lr 1.000e-03, 2,345 tokens/s, 0.12 GB peak memory, tier updates 20/10/5

``loss`` is the mean of the steps since the last line and tokens/s their tokens over their
time, as mlx-lm reports them; the same window is what a ``training_callback``'s
``on_train_loss_report`` receives (mlx-lm's fields, plus ``tier_updates``).  Validation lines (``step 50: valid loss 1.2345``) print in both
modes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Reporter", "report_line"]


def report_line(
    step: int,
    total: int,
    loss: float,
    lr: float,
    tokens_per_sec: float,
    peak_gb: float,
    tiers: list[int] | None,
) -> str:
    line = (
        f"step {step}/{total}: loss {loss:.3f}, lr {lr:.3e}, {tokens_per_sec:,.0f} tokens/s, "
        f"{peak_gb:.2f} GB peak memory"
    )
    if tiers is not None:
        line += ", tier updates " + "/".join(map(str, tiers))
    return line


class Reporter:
    """The bar or the lines of one run (``enabled=False``: rank > 0, silent), and the report
    windows: every ``every`` steps (and at the last step) ``step`` returns mlx-lm's
    ``on_train_loss_report`` fields for the steps since the last report, printed as a line
    when the output is not a terminal."""

    def __init__(
        self,
        total: int,
        initial: int,
        every: int,
        enabled: bool,
        log: Callable[[str], None] = print,
        terminal: bool | None = None,
        trained_tokens: float = 0.0,
    ):
        self.total, self.every, self.enabled, self.log = total, every, enabled, log
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.trained_tokens = trained_tokens
        self._losses: list[float] = []
        self._tokens = self._time = 0.0
        self._bar: Any = None
        if enabled and self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        tokens: float,
        seconds: float,
        peak_gb: float,
        tiers: list[int] | None,
    ) -> dict[str, Any] | None:
        self._losses.append(loss)
        self._tokens += tokens
        self._time += seconds
        tps = self._tokens / self._time if self._time else 0.0
        if self._bar is not None:
            post = f"loss {loss:.3f}  tok/s {tps:,.0f}  peak {peak_gb:.2f} GB"
            if tiers is not None:
                post += "  tier updates " + "/".join(map(str, tiers))
            self._bar.set_postfix_str(post, refresh=False)
            self._bar.update(1)
        if step % self.every and step != self.total:
            return None
        mean = sum(self._losses) / len(self._losses)
        self.trained_tokens += self._tokens
        info = {
            "iteration": step,
            "train_loss": mean,
            "learning_rate": lr,
            "iterations_per_second": len(self._losses) / self._time if self._time else 0.0,
            "tokens_per_second": tps,
            "trained_tokens": self.trained_tokens,
            "peak_memory": peak_gb,
            "tier_updates": tiers,
        }
        if self.enabled and self._bar is None:
            self.log(report_line(step, self.total, mean, lr, tps, peak_gb, tiers))
        self._losses, self._tokens, self._time = [], 0.0, 0.0
        return info

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            self.log(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
