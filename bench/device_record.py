"""What the device scripts (bench/gpu.py, bench/graph_generate.py) share: one JSON record, written again after
every measurement so that a call cut off by its time limit keeps what it measured, and sections run in the
order asked within a time budget, a failing one recorded without stopping the rest."""

from __future__ import annotations

import json
import platform
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


class RunRecord:
    """`out` (the figures, with the versions and the device) saved to `path` by `save()`."""

    def __init__(self, path: Path, device: torch.device, **header: object):
        import transformers

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.out: dict = {
            "device": device_name(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            **header,
        }
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.out["seconds"] = self.elapsed()
        self.path.write_text(json.dumps(self.out, indent=2, default=str))

    def sections(self, names: list[str], budget_s: float) -> Iterator[tuple[str, str]]:
        """(section, its key in `out`) for each of `names` in the order asked, none started after `budget_s`
        seconds (a skipped one says so); each section's seconds recorded and the record saved after it."""
        for section in dict.fromkeys(names):
            key = section.replace("-", "_")
            if self.elapsed() > budget_s:
                self.out[key] = f"skipped: {self.elapsed():.0f} s spent, budget {budget_s:.0f} s"
                self.save()
                continue
            t0 = time.perf_counter()
            print(f"# {section} ({self.elapsed():.0f} s in) ...", flush=True)
            yield section, key
            self.out[f"{key}_seconds"] = round(time.perf_counter() - t0, 1)
            self.save()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @contextmanager
    def kept(self, key: str, strict: bool = False) -> Iterator[None]:
        """Record an exception of the block as `out[key + "_error"]` and go on (one device run is precious: the
        other sections' figures count), unless `strict` (a smoke run fails loudly)."""
        try:
            yield
        except Exception as exc:
            if strict:
                raise
            traceback.print_exc()
            self.out[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
