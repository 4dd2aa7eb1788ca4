"""Write csrc/spec_codes.h from the spec module (mezo_kernels/rng/, via mezo_kernels/rng/header.py), or check it.

    python tools/gen_spec_header.py          # rewrite the header
    python tools/gen_spec_header.py --check  # exit 1 if the committed header differs from the spec

Run it after changing a shared constant, kernel mode or dtype code in rng.py, then rebuild the extension
(`pip install -e .`); tests/test_spec_codes.py fails until both are done.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mezo_kernels.rng import header as spec_header  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the header is stale")
    args = ap.parse_args(argv)
    path = ROOT / spec_header.HEADER_PATH
    text = spec_header.emit_header()
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is stale: run `python tools/gen_spec_header.py`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
