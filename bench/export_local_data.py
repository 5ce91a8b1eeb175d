"""Write a built-in data set as a JSONL file of ``{"prompt", "response"}`` records, for ``data.dataset = "local"``.

The SplitCom settings must hold on generation data loaded through the local-file loader, not only on the bundled
E2E NLG; this turns another bundled source (chatterbot-corpus Q&A by default) into such a file, so a benchmark can
run it exactly as a user's own file would be run:

    python bench/export_local_data.py --dataset chatterbot --out bench/out/data/chatterbot.jsonl
    python bench/splitcom_bench.py --set data.dataset=local --set data.path=bench/out/data/chatterbot.jsonl \\
        --variants vanilla,shipped --out bench/out/splitcom-chatterbot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedtune.config.sections import DataConfig
from fedtune.data.sources import DATASETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="chatterbot", help=f"built-in source: {', '.join(DATASETS)}")
    parser.add_argument("--out", default="bench/out/data/chatterbot.jsonl", help="JSONL file to write")
    args = parser.parse_args()
    train, evaluation, _ = DATASETS.get(args.dataset)(DataConfig(dataset=args.dataset))
    rows = [*train, *(evaluation or [])]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"], "response": row["response"]}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} records -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
