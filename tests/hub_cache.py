"""A hub dataset repository laid out in a Hugging Face cache by hand (no network), as the hub lays out
UltraFeedback-binarized: ``data/<split>-00000-of-00001.parquet``, found through ``refs/main``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATASET_ID = "pref-org/ultrafeedback-like"
DATASET_SNAPSHOT = "c" * 40
SPLITS = {"train_prefs": 5, "test_prefs": 2}


def cache_dataset(cache: Path, tmp_path: Path) -> dict[str, Path]:
    """Put DATASET_ID into the hub cache ``cache``: each split of SPLITS with that many UltraFeedback-like pairs."""
    files = tmp_path / "dataset-files"
    (files / "data").mkdir(parents=True)
    split_files = {}
    for split, n in SPLITS.items():
        records = [
            {
                "prompt": f"{i}+1?",
                "chosen": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}],
                "rejected": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 2)}],
            }
            for i in range(n)
        ]
        split_files[split] = files / "data" / f"{split}-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(records), split_files[split])
    (files / "README.md").write_text("---\nconfigs: []\n---\n")
    repo_dir = cache / f"datasets--{DATASET_ID.replace('/', '--')}"
    shutil.copytree(files, repo_dir / "snapshots" / DATASET_SNAPSHOT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(DATASET_SNAPSHOT)  # no newline: huggingface_hub reads it verbatim
    return split_files
