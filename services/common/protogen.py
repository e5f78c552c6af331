"""Generate the Python stubs in services/pb from protos/, or check that they are current.

protoc names generated modules after the proto's path (``ssjf/v1/x.proto`` imports as
``ssjf.v1.x_pb2``); we rewrite those imports to package-relative ones so the stubs live in
``services.pb`` apart from hand-written code, the way Hugging Face TGI vendors its stubs.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

from services.common.paths import CHECKOUT_ROOT

PROTO_ROOT = CHECKOUT_ROOT / "protos"
_ABSOLUTE_IMPORT = re.compile(r"^from ssjf\.v1 import (\w+_pb2)", re.MULTILINE)
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_dir: Path) -> None:
    """Compile every proto under protos/ into out_dir (flat, relative imports)."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.iterdir():
            if stale.name.endswith(_GENERATED_SUFFIXES):
                stale.unlink()
        for produced in sorted((Path(tmp) / "ssjf" / "v1").iterdir()):
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1", produced.read_text())
            (out_dir / produced.name).write_text(text)


def check(out_dir: Path) -> bool:
    """True when out_dir holds exactly what generate() would write."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "pb"
        generate(fresh)
        names = {p.name for p in fresh.iterdir()}
        current = {p.name for p in out_dir.iterdir() if p.name.endswith(_GENERATED_SUFFIXES)}
        if names != current:
            print(f"stale stubs: expected {sorted(names)}, found {sorted(current)}")
            return False
        _, mismatch, errors = filecmp.cmpfiles(fresh, out_dir, sorted(names), shallow=False)
        if mismatch or errors:
            print(f"stale stubs differ from protos/: {mismatch + errors}")
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="where the stubs go (services/pb)")
    parser.add_argument("--check", action="store_true", help="only check they are current")
    args = parser.parse_args()
    if args.check:
        if not check(args.out_dir):
            print("run `make proto` and commit the result", file=sys.stderr)
            sys.exit(1)
        print("services/pb is current with protos/")
        return
    generate(args.out_dir)
    shutil.rmtree(args.out_dir / "__pycache__", ignore_errors=True)
    print(f"generated stubs in {args.out_dir}")


if __name__ == "__main__":
    main()
