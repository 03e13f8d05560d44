"""What long commands print while they work: a tqdm bar on a terminal, plain periodic lines in a log.

A carriage-return bar is one unreadable line per update in a file or CI log, so when stderr is not a terminal the
trainer prints `step 40/400  loss 0.1234  lr 1.00e-03  0.52 s/step` about ten times per run instead (the convention
of kohya's and diffusers' training scripts under a logger). The libraries' own loading bars ("Loading pipeline
components", "Loading weights", "Writing model shards") say nothing a user acts on; the CLI silences them.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

# Plain lines per run when stderr is not a terminal (plus the first and the last step).
PLAIN_LINES = 10


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress goes to an interactive terminal (where a redrawn bar reads well)."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def silence_library_progress() -> None:
    """Turn off diffusers', transformers' and huggingface_hub's loading and saving bars (not the sampling bar,
    which `StableDiffusionPipeline.set_progress_bar_config` controls)."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()


class StepProgress:
    """Progress of a loop of `total` steps: a tqdm bar on a terminal, else a plain line every ~total/10 steps with
    the step, the given values and the seconds per step since the previous line."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.step, self.desc = total, initial, desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.every = max(1, total // PLAIN_LINES)
        self.bar = (tqdm(total=total, initial=initial, desc=desc, unit="step", file=self.stream)
                    if enabled and is_terminal(self.stream) else None)
        self._since = (initial, time.perf_counter())

    def update(self, **values: float) -> None:
        """One step done; `values` (loss=..., lr=...) are shown next to it."""
        self.step += 1
        text = {k: f"{v:.2e}" if k == "lr" else f"{v:.4f}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(text)
        elif self.enabled and (self.step % self.every == 0 or self.step in (1, self.total)):
            start_step, start_time = self._since
            now = time.perf_counter()
            per_step = (now - start_time) / max(1, self.step - start_step)
            fields = "  ".join(f"{k} {v}" for k, v in text.items())
            print(f"{self.desc}: step {self.step}/{self.total}  {fields}  {per_step:.2f} s/step",
                  file=self.stream, flush=True)
            self._since = (self.step, now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
