"""Record the behaviour lock (tests/behaviour.py): every preset's outputs on both digits models.

    .venv/bin/python scripts/record_behaviour.py [--check]

Run once per platform (CPU vendor / capability / AMX: tests/behaviour.py) on a known-good tree;
``tests/test_behaviour.py`` then asserts bit-identical outputs.
``--check`` compares instead of writing. One torch thread, so the reductions have one order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import behaviour


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    behaviour.DATA.mkdir(exist_ok=True)
    for name in behaviour.MODELS:
        out = behaviour.compute(name)
        if args.check:
            ref = load_file(behaviour.path(name))
            bad = [k for k in ref if not torch.equal(ref[k], out[k])]
            print(name, "identical" if not bad and set(ref) == set(out) else f"DIFFERENT: {bad}")
        else:
            save_file({k: v.contiguous() for k, v in out.items()}, behaviour.path(name))
            print(name, len(out), "presets recorded for", behaviour.platform_key())


if __name__ == "__main__":
    main()
