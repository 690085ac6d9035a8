"""One slim wheelhouse for the GPU training bench: the project's training dependencies and the peers' together.

    python bench/wheelhouse.py OUT SRC_DIR [SRC_DIR ...] [--for train|serve]

Copies every wheel from the source folders into OUT (a package found in several folders: the first folder's
wins, so list the peers' folder first where it pins an older ``datasets``), leaves out what a training bench
never imports (Ray Serve's web stack, DeepSpeed), strips symbol tables from ELF binaries (Ray's raylet,
GCS server and ``_raylet.so`` ship unstripped) and recompresses every member with LZMA, which pip reads.
Ray's wheel goes from 43 MB to about 26 MB; the whole set fits in what one offline GPU command may carry.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# imported only by Ray Serve (the training bench), by the ZeRO variants (DeepSpeed), or only by training and
# data preparation (the serving bench loads a saved model and serves it)
DROP = {"train": {"fastapi", "starlette", "uvicorn", "httptools", "watchfiles", "websockets", "grpcio_reflection",
                  "python_dotenv", "deepspeed", "hjson", "ninja", "py_cpuinfo"},
        "serve": {"bitsandbytes", "datasets", "pypdf", "multiprocess", "dill", "deepspeed", "hjson", "ninja",
                  "py_cpuinfo"}}


def package(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("-", "_")


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def strip(data: bytes) -> bytes:
    """``data`` without symbol tables (``strip --strip-unneeded``); unchanged where strip is missing or fails."""
    if not shutil.which("strip"):
        return data
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        ok = subprocess.run(["strip", "--strip-unneeded", f.name], capture_output=True).returncode == 0
        return Path(f.name).read_bytes() if ok else data
    finally:
        os.unlink(f.name)


def repack(src: Path, dst: Path) -> None:
    """``src`` rewritten to ``dst`` with stripped binaries and LZMA members (RECORD hashes follow)."""
    import base64
    import hashlib

    with zipfile.ZipFile(src) as zin:
        members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
        infos = {i.filename: i for i in zin.infolist()}
    changed = {}
    for name, data in members.items():
        if is_elf(data):
            slim = strip(data)
            if slim is not data:
                changed[name] = slim
    members.update(changed)
    record = next((n for n in members if n.endswith(".dist-info/RECORD")), None)
    if record and changed:
        lines = []
        for line in members[record].decode().splitlines():
            path = line.split(",")[0]
            if path in changed:
                digest = base64.urlsafe_b64encode(hashlib.sha256(changed[path]).digest()).rstrip(b"=").decode()
                line = f"{path},sha256={digest},{len(changed[path])}"
            lines.append(line)
        members[record] = ("\n".join(lines) + "\n").encode()
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zout:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=infos[name].date_time)
            info.external_attr = infos[name].external_attr
            info.compress_type = zipfile.ZIP_LZMA
            zout.writestr(info, data)
    os.replace(tmp, dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("sources", type=Path, nargs="+")
    ap.add_argument("--for", dest="purpose", choices=list(DROP), default="train")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()
    seen: set[str] = set()
    for src in args.sources:
        for wheel in sorted(src.glob("*.whl")):
            name = package(wheel)
            if name in seen or name in DROP[args.purpose]:
                continue
            seen.add(name)
            repack(wheel, args.out / wheel.name)
    total = sum(w.stat().st_size for w in args.out.glob("*.whl"))
    print(f"{args.out}: {len(seen)} wheels, {total / 2**20:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
