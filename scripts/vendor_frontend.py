#!/usr/bin/env python3
"""Vendor the dashboard's front-end libraries at pinned versions, from the npm registry.

The dashboard must work on a cluster with no internet, so its libraries are committed under
`control_plane/dashboard/static/vendor/`, never loaded from a CDN. This script is the only way
they change: it fetches each pinned package with `npm pack` (npm's own client, its configured
registry), checks the tarball against the registry's integrity hash, copies the files the pages
use and the package's licence, and writes `MANIFEST.json` with each file's sha256.

    python scripts/vendor_frontend.py           # fetch and write
    python scripts/vendor_frontend.py --check   # only verify the committed files' sha256
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "control_plane/dashboard/static/vendor"

# package, pinned version, {file in the tarball: name under vendor/<dir>/}, licence file (shipped as LICENSE.txt: the wheel takes *.txt), dir
PACKAGES: list[dict[str, object]] = [
    {
        "name": "htmx.org",
        "version": "2.0.11",
        "dir": "htmx",
        "files": {"dist/htmx.min.js": "htmx.min.js"},
        "license_file": "LICENSE",
    },
    {
        "name": "uplot",
        "version": "1.6.32",
        "dir": "uplot",
        "files": {
            "dist/uPlot.iife.min.js": "uPlot.iife.min.js",
            "dist/uPlot.min.css": "uPlot.min.css",
        },
        "license_file": "LICENSE",
    },
    {
        "name": "@picocss/pico",
        "version": "2.1.1",
        "dir": "pico",
        "files": {"css/pico.min.css": "pico.min.css"},
        "license_file": "LICENSE.md",
    },
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def npm_pack(spec: str, into: Path) -> tuple[Path, dict[str, object]]:
    """The package's tarball (downloaded by npm) and npm's description of it."""
    out = subprocess.run(
        ["npm", "pack", spec, "--json", "--pack-destination", str(into)],
        check=True,
        capture_output=True,
        text=True,
        cwd=into,
    )
    info = json.loads(out.stdout)[0]
    return into / info["filename"], info


def check_integrity(tarball: Path, integrity: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
    if digest != expected:
        raise SystemExit(f"{tarball.name}: {algorithm} does not match the registry's integrity")


def vendor() -> None:
    manifest: dict[str, object] = {
        "comment": "Written by scripts/vendor_frontend.py; do not edit by hand.",
        "packages": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in PACKAGES:
            spec = f"{pkg['name']}@{pkg['version']}"
            tarball, info = npm_pack(spec, Path(tmp))
            check_integrity(tarball, str(info["integrity"]))
            target = VENDOR / str(pkg["dir"])
            target.mkdir(parents=True, exist_ok=True)
            wanted = {**dict(pkg["files"]), str(pkg["license_file"]): "LICENSE.txt"}  # type: ignore[arg-type]
            with tarfile.open(tarball) as tar:
                for source, name in wanted.items():
                    member = tar.extractfile(f"package/{source}")
                    if member is None:
                        raise SystemExit(f"{spec}: no {source} in the package")
                    (target / name).write_bytes(member.read())
            with tarfile.open(tarball) as tar:
                package_json = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
            files = sorted([*dict(pkg["files"]).values(), "LICENSE.txt"])  # type: ignore[arg-type]
            manifest["packages"].append(  # type: ignore[attr-defined]
                {
                    "name": pkg["name"],
                    "version": pkg["version"],
                    "license": package_json.get("license"),
                    "tarball_integrity": info["integrity"],
                    "files": {f"{pkg['dir']}/{name}": sha256(target / name) for name in files},
                }
            )
            print(f"vendored {spec}")
    (VENDOR / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


def check() -> int:
    manifest = json.loads((VENDOR / "MANIFEST.json").read_text())
    bad = [
        path
        for pkg in manifest["packages"]
        for path, digest in pkg["files"].items()
        if not (VENDOR / path).is_file() or sha256(VENDOR / path) != digest
    ]
    for path in bad:
        print(f"{path}: missing or not the vendored bytes", file=sys.stderr)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the committed files")
    args = parser.parse_args()
    if args.check:
        return check()
    vendor()
    return check()


if __name__ == "__main__":
    sys.exit(main())
