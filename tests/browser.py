"""A real headless Chromium for tests: load a page from file:// and report what it rendered.

`chromium()` finds Debian's chromium (installing it with apt-get when we are root and it is
missing, as .ci/run does); None only when it can be neither found nor installed.
`render(page, workdir)` loads a COPY of the page with a small script appended that writes
every image's decoded size into the DOM, dumps the DOM, and takes a screenshot of the page
itself. Both Chromium processes are started and ended by PID (simulations/harness/procs.py), with
their own profile folder, and no network features.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from simulations.harness.procs import Procs

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
CHECK = (
    '<script>window.addEventListener("load",()=>{const p=document.createElement("pre");'
    'p.id="img-check";p.textContent=[...document.images].map(i=>"IMG "+i.naturalWidth+"x"+'
    'i.naturalHeight+" "+i.alt).join("\\n");document.body.appendChild(p);});</script>'
)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq chromium",
            shell=True,
            capture_output=True,
            timeout=900,
            check=False,
        )
    return shutil.which("chromium")


def render(page: Path, workdir: Path, size: str = "1100,2400") -> tuple[list[tuple], Path]:
    """([(width, height, alt) per <img>], screenshot) of `page` as Chromium shows it."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium")
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    shot = workdir / "screenshot.png"
    with Procs(workdir / "logs") as procs:
        env = dict(os.environ)
        common = [exe, *FLAGS, f"--user-data-dir={workdir / 'profile'}"]
        _, dom = procs.run(
            "chromium-dom",
            [*common, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
            env=env,
            timeout=120,
        )
        procs.run(
            "chromium-shot",
            [*common, f"--window-size={size}", f"--screenshot={shot}", page.as_uri()],
            env=env,
            timeout=120,
        )
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom, re.S)
    lines = found.group(1).splitlines() if found else []
    images = [
        (int(w), int(h), alt)
        for w, h, alt in (re.match(r"IMG (\d+)x(\d+) (.*)", line).groups() for line in lines)
    ]
    return images, shot
