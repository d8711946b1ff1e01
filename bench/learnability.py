"""Train as tests/test_trainer.py's learnability test does and score the chosen checkpoint on unseen families.

Compares model-selection rules across versions: run it from two checkouts on the same data folder.

    PYTHONPATH=. .venv/bin/python bench/learnability.py /tmp/learn new 111
    (cd ../old-checkout && PYTHONPATH=. /path/to/.venv/bin/python /path/to/bench/learnability.py /tmp/learn old 111)

Prints one line `RESULT {json}`: the rule, the chosen epoch, and (image AUROC, pixel AUROC) on the unseen
families for the untrained prompts, `best` and `last`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.factories import tiny_config
from tests.test_trainer import TRAIN_FAMILIES, UNSEEN_FAMILIES, mean_auroc, quick_settings, synthetic_set
from trainer.training import PromptTrainer


def main() -> None:
    root, name = Path(sys.argv[1]), sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 111
    root.mkdir(parents=True, exist_ok=True)
    data = root / "train"
    if not data.exists():
        synthetic_set(data, TRAIN_FAMILIES, 60, seed=11)
        synthetic_set(root / "unseen", UNSEEN_FAMILIES, 50, seed=12)
    started = time.time()
    run = PromptTrainer(
        tiny_config(), quick_settings(seed=seed), [f"synthetic:{data}@all"], root / name, show_progress=False
    ).run()
    unseen = f"synthetic:{root / 'unseen'}"
    result = {
        "seed": seed,
        "rule": getattr(run, "selection", "") or "10 % of images",
        "best_epoch": run.best_epoch,
        "untrained": mean_auroc(None, unseen),
        "best": mean_auroc(run.best, unseen),
        "last": mean_auroc(run.last, unseen),
        "seconds": round(time.time() - started),
    }
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main()
