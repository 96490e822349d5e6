"""The dashboard's front end as shipped: vendored libraries are the bytes their manifest
records (with their licences), and no template loads anything from another origin or carries
inline script or style that the Content-Security-Policy would block."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import control_plane.dashboard as dashboard

ROOT = Path(dashboard.__file__).parent
VENDOR = ROOT / "static" / "vendor"
TEMPLATES = sorted((ROOT / "templates").glob("*.html"))


def test_every_vendored_file_matches_its_manifest_and_each_package_has_its_licence() -> None:
    manifest = json.loads((VENDOR / "MANIFEST.json").read_text())
    listed: set[str] = set()
    for package in manifest["packages"]:
        assert package["version"] and package["license"]
        assert any(path.endswith("/LICENSE.txt") for path in package["files"])
        for path, digest in package["files"].items():
            assert hashlib.sha256((VENDOR / path).read_bytes()).hexdigest() == digest, path
            listed.add(path)
    on_disk = {
        str(p.relative_to(VENDOR))
        for p in VENDOR.rglob("*")
        if p.is_file() and p.name != "MANIFEST.json"
    }
    assert on_disk == listed


def test_templates_load_nothing_from_elsewhere_and_hold_no_inline_script_or_style() -> None:
    assert TEMPLATES
    for template in TEMPLATES:
        html = template.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", html), template.name
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), template.name
        assert not re.search(r"\son[a-z]+=", html), template.name
        assert not re.search(r"\sstyle=", html), template.name
        assert "<style" not in html, template.name
