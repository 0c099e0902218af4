"""Render the demo report in headless Chromium and save a screenshot (a check with a person's eyes).

Needs Debian's chromium (`apt-get install chromium`); runs `mechscope demo` first when the report
is missing. Usage: python bench/screenshot_report.py [report.html] [out.png]
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main():
    report = Path(sys.argv[1] if len(sys.argv) > 1 else "mechscope-demo/report.html").resolve()
    out = Path(sys.argv[2] if len(sys.argv) > 2 else report.with_name("report_screenshot.png")).resolve()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium is not installed (apt-get install chromium)")
        return 1
    if not report.exists():
        subprocess.run([sys.executable, "-m", "mechscope.cli", "demo", "--out", str(report.parent)], check=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1280,2400",
                        f"--screenshot={out}", report.as_uri()], check=True, capture_output=True, timeout=120)
    print(f"screenshot: {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
