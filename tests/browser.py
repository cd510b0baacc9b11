"""A real headless browser (Debian chromium + chromium-driver, through Selenium) for report checks.

:func:`open_browser` returns a driver or raises :class:`NoBrowser` saying what is missing; CI
(``.ci/run``) installs the browser and sets ``HWREL_REQUIRE_BROWSER=1`` so a missing browser fails
there instead of skipping. :func:`inspect_page` loads a page at a given viewport and reports what
the tests assert: console errors, each figure's load state and sizes, and where the executive
summary ends. Nothing is downloaded: the browser and driver are the ones installed on the machine.

    python tests/browser.py REPORT/index.html OUT.png    # a 1400x900 screenshot (+ OUT-full.png)
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)


class NoBrowser(RuntimeError):
    """No usable headless browser on this machine (the message says what is missing)."""


def _find(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    for p in extra:
        if os.path.exists(p):
            return p
    return None


def open_browser(width: int = 1400, height: int = 900):
    """A headless Chromium driven by Selenium, viewport ``width`` x ``height`` CSS pixels."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise NoBrowser("selenium is not installed (pip install -e '.[test]')") from None
    binary = _find(BROWSERS)
    driver = _find(DRIVERS, ("/usr/lib/chromium/chromedriver",))
    if binary is None or driver is None:
        raise NoBrowser("no chromium/chromedriver found (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    except Exception as exc:  # the binary exists but cannot start (e.g. missing libraries)
        raise NoBrowser(f"chromium at {binary} did not start: {str(exc).splitlines()[0]}") from None
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return d


_PROBE = """
const imgs = Array.from(document.querySelectorAll('figure img')).map(i => ({
  id: i.parentElement.id, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
  shown: [i.getBoundingClientRect().width, i.getBoundingClientRect().height],
  src: i.getAttribute('src').slice(0, 26)}));
const ex = document.getElementById('executive');
const r = ex ? ex.getBoundingClientRect() : null;
const font = Array.from(document.querySelectorAll('#executive td, #executive div'))
  .map(e => parseFloat(getComputedStyle(e).fontSize));
return {images: imgs, viewport: [innerWidth, innerHeight], scroll: [scrollX, scrollY],
        summary: r ? {top: r.top, bottom: r.bottom, left: r.left, right: r.right} : null,
        summary_text: ex ? ex.innerText : '', min_summary_font: font.length ? Math.min(...font) : 0,
        title: document.title};
"""


def inspect_page(driver, path: Path, screenshot: Path | None = None) -> dict:
    """Load ``path`` and return the probe's findings plus ``console`` (SEVERE browser log lines)."""
    driver.get(Path(path).resolve().as_uri())
    driver.execute_script("return document.fonts ? document.fonts.ready : true")
    info = driver.execute_script(_PROBE)
    if screenshot is not None:
        driver.save_screenshot(str(screenshot))
    info["console"] = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    return info


def full_screenshot(driver, out: Path, width: int = 1400) -> None:
    """The whole page in one PNG (for looking at, not for tests)."""
    h = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": min(h, 16000), "deviceScaleFactor": 1, "mobile": False})
    driver.save_screenshot(str(out))


if __name__ == "__main__":
    page, shot = Path(sys.argv[1]), Path(sys.argv[2])
    d = open_browser()
    try:
        found = inspect_page(d, page, shot)
        print({k: v for k, v in found.items() if k != "summary_text"})
        full_screenshot(d, shot.with_name(shot.stem + "-full.png"))
    finally:
        d.quit()
