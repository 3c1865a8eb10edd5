"""A driver process that scores a config's pairs through the reference store, as `rayalign reference` does,
and writes which pairs it got back (tests/test_reference_store.py runs two at once).

    python tests/store_writer.py CONFIG.json OUT.json     # joins RAY_ADDRESS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rayalign.config import config_from_dict
from rayalign.data.stage import prepare_data
from rayalign.reference.store import scored_through_store
from rayalign.schema import REF_CHOSEN_LOGPS, ROW, SOURCE


def main(config_path: str, out_path: str) -> None:
    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    cfg.output.run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, cfg.output.run_dir, None)
    scored, report = scored_through_store(data.pairs, cfg, data.model)
    rows = scored.select_columns([SOURCE, ROW, REF_CHOSEN_LOGPS]).take_all()
    Path(out_path).write_text(
        json.dumps(
            {
                "report": report.as_dict(),
                "pairs": [[Path(r[SOURCE]).name, r[ROW]] for r in rows],
                "ref_chosen_logps": {f"{Path(r[SOURCE]).name}:{r[ROW]}": r[REF_CHOSEN_LOGPS] for r in rows},
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
