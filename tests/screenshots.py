"""Screenshots compared with reference images kept under tests/screenshots/ (Pillow).

The references were taken on this kind of machine: Debian's chromium (tests/browser.py), the DejaVu
fonts that scripts/setup.sh installs, and only those (`FONTS_CONF` hides any other font installed,
so a machine with more fonts renders the same). Regions that hold times or generated ids are
masked by Playwright (painted one colour in the reference and the shot alike) before comparing.

A pixel differs when one of its channels differs by more than `PIXEL_THRESHOLD` (0-255); a shot
matches when at most `MAX_SHARE` of its pixels differ and its size is the reference's. A shot that
does not match is written next to the test's output as NAME.actual.png with NAME.diff.png (the
differing pixels in red over a faded copy), and the failure names both files.

MCPFLEET_UPDATE_SCREENSHOTS=1 writes the shots as the new references instead of comparing, and
records the renderer that took them in tests/screenshots/RENDERER (chromium's major version and the
Debian release). Another renderer draws text a little differently, so references are compared only
on the renderer that took them: elsewhere the comparison says so and is skipped (`renderer_mismatch`),
while the check that a changed style fails compares shots taken in the same run.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops

REFERENCES = Path(__file__).resolve().parent / "screenshots"
FONTS_CONF = REFERENCES / "fonts.conf"
UPDATE = os.environ.get("MCPFLEET_UPDATE_SCREENSHOTS") == "1"
RENDERER_FILE = REFERENCES / "RENDERER"
PIXEL_THRESHOLD = 40
MAX_SHARE = 0.002


@dataclass
class Comparison:
    name: str
    matches: bool
    differing: int
    share: float
    message: str
    actual: Path | None = None
    diff: Path | None = None


def renderer(chromium: str) -> str:
    """'chromium-MAJOR debian-RELEASE': what decides how the references look."""
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True, check=True).stdout
    major = re.search(r"(\d+)\.\d+\.\d+", version)
    release = ""
    if Path("/etc/debian_version").exists():
        release = Path("/etc/debian_version").read_text().strip().split(".")[0]
    return f"chromium-{major.group(1) if major else 'unknown'} debian-{release or 'unknown'}"


def renderer_mismatch(chromium: str) -> str | None:
    """Why the references cannot be compared on this machine, or None when they can (or are being made)."""
    if UPDATE:
        RENDERER_FILE.write_text(renderer(chromium) + "\n")
        return None
    taken = RENDERER_FILE.read_text().strip() if RENDERER_FILE.exists() else "an unrecorded renderer"
    here = renderer(chromium)
    if taken == here:
        return None
    return (f"the references were taken with {taken} and this machine has {here}: "
            "MCPFLEET_UPDATE_SCREENSHOTS=1 takes references for it")


def compare(name: str, shot: bytes, out_dir: Path, *, threshold: int = PIXEL_THRESHOLD, max_share: float = MAX_SHARE,
            update: bool = UPDATE, references: Path = REFERENCES) -> Comparison:
    """Compare a PNG screenshot with REFERENCES/NAME.png (or, with `update`, make it the reference)."""
    reference = references / f"{name}.png"
    actual = Image.open(io.BytesIO(shot)).convert("RGB")
    if update:
        references.mkdir(exist_ok=True)
        actual.save(reference, optimize=True)
        return Comparison(name, True, 0, 0.0, f"{reference} written")
    if not reference.exists():
        return _failed(name, actual, None, out_dir, f"no reference {reference} (MCPFLEET_UPDATE_SCREENSHOTS=1 makes it)")
    expected = Image.open(reference).convert("RGB")
    if expected.size != actual.size:
        return _failed(name, actual, expected, out_dir, f"size {actual.size} where the reference is {expected.size}")
    # Per pixel, the largest difference of its channels; over the threshold, the pixel differs.
    delta = ImageChops.difference(expected, actual).split()
    largest = ImageChops.lighter(ImageChops.lighter(delta[0], delta[1]), delta[2])
    differs = largest.point(lambda v: 255 if v > threshold else 0)
    count = differs.histogram()[255]
    share = count / (actual.width * actual.height)
    if share > max_share:
        return _failed(name, actual, expected, out_dir, f"{count} pixels ({share:.2%}) differ, more than {max_share:.2%}",
                       differs=differs, count=count, share=share)
    return Comparison(name, True, count, share, f"{count} pixels ({share:.3%}) differ")


def _failed(name: str, actual: Image.Image, expected: Image.Image | None, out_dir: Path, why: str, *,
            differs: Image.Image | None = None, count: int = -1, share: float = 1.0) -> Comparison:
    out_dir.mkdir(parents=True, exist_ok=True)
    actual_path, diff_path = out_dir / f"{name}.actual.png", out_dir / f"{name}.diff.png"
    actual.save(actual_path)
    if expected is not None:
        # Same canvas for both (a size change shows as the whole missing or extra band differing).
        size = (max(actual.width, expected.width), max(actual.height, expected.height))
        a, e = (Image.new("RGB", size, "white") for _ in range(2))
        a.paste(actual), e.paste(expected)
        if differs is None or differs.size != size:
            delta = ImageChops.difference(a, e).convert("L")
            differs = delta.point(lambda v: 255 if v > PIXEL_THRESHOLD else 0)
        faded = Image.blend(e, Image.new("RGB", size, "white"), 0.7)
        faded.paste(Image.new("RGB", size, (255, 0, 0)), mask=differs)
        faded.save(diff_path)
    message = f"{name}: {why}; the shot is {actual_path}" + (f", the difference {diff_path}" if expected is not None else "")
    return Comparison(name, False, count, share, message, actual_path, diff_path if expected is not None else None)
