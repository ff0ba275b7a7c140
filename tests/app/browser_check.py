"""The dashboard in a real headless Chromium (a script, not a test: pytest does not collect it; run by
``.ci/browser_check.sh``, which starts the server).

    python tests/app/browser_check.py --url http://127.0.0.1:PORT --out .ci/artifacts

Checks, on the running app: every page loads and shows no exception ("Traceback", st.exception blocks)
and no error alert; the Estimate page draws its plotly charts (``.js-plotly-plot``) and its key numbers;
typing a micro-batch re-estimates and writes the scenario into the URL; a shared link with a setup that
does not fit restores it and shows the suggestions.  A screenshot of each page is saved under ``--out``.
Exit status 0 when every check passes, 1 otherwise (each failure printed on one line).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1600,2000")
TIMEOUT_S = 90

# page, path, title on the page, plotly charts expected at least
PAGES = (
    ("estimate", "/", "Will it fit?", 3),
    ("compare", "/compare", "Compare scenarios", 1),
    ("plan", "/plan", "Plan a setup", 0),  # no chart before "Plan" is pressed
    ("hardware", "/hardware", "Hardware", 1),
    ("validation", "/validation", "Validation", 0),
)
NO_FIT = {"model": "llama-3.1-70b", "gpu": "rtx-4090-24gb"}


class Check:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            self.failures.append(what)
        return ok


def driver(profile: str) -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def wait(d: webdriver.Chrome, cond: Callable[[webdriver.Chrome], object], timeout: float = TIMEOUT_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond(d):
                return True
        except Exception:  # the page is being redrawn: try again
            pass
        time.sleep(0.25)
    return False


def idle(d: webdriver.Chrome) -> bool:
    """The script run finished: the app is mounted and no 'running' indicator is shown for a moment."""
    def quiet(dr):
        return dr.find_elements(By.CSS_SELECTOR, '[data-testid="stApp"]') and not dr.find_elements(
            By.CSS_SELECTOR, '[data-testid="stStatusWidget"] [data-testid="stStatusWidgetRunningIcon"], '
                             '[data-testid="stStatusWidget"] img')
    return wait(d, quiet) and (time.sleep(1.0) or wait(d, quiet))


def body(d: webdriver.Chrome) -> str:
    return d.find_element(By.TAG_NAME, "body").text


def no_errors(d: webdriver.Chrome, check: Check, page: str) -> None:
    exceptions = d.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    check(not exceptions, f"{page}: no st.exception block" + (f" ({exceptions[0].text[:200]!r})" if exceptions else ""))
    check("Traceback" not in body(d), f"{page}: no traceback text")
    alerts = [e.text for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')]
    check(not alerts, f"{page}: no error alert" + (f" ({alerts[0][:200]!r})" if alerts else ""))


def plotly_count(d: webdriver.Chrome) -> int:
    return len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"))


def screenshot(d: webdriver.Chrome, out: Path, name: str) -> None:
    path = out / f"{name}.png"
    d.save_screenshot(str(path))
    print(f"      screenshot {path}")


def check_pages(d: webdriver.Chrome, base: str, out: Path, check: Check) -> None:
    for name, path, title, charts in PAGES:
        d.get(base + path)
        loaded = wait(d, lambda dr, t=title: any(h.text.strip() == t for h in dr.find_elements(By.TAG_NAME, "h1")))
        check(loaded, f"{name}: page loads with its title {title!r}")
        idle(d)
        if charts:
            check(wait(d, lambda dr, n=charts: plotly_count(dr) >= n), f"{name}: {charts}+ plotly charts drawn "
                  f"(found {plotly_count(d)})")
        no_errors(d, check, name)
        if name == "estimate":
            text = body(d)
            check("Peak memory" in text and "Fits" in text, "estimate: verdict and key numbers shown")
        screenshot(d, out, name)


def check_widget_updates_url(d: webdriver.Chrome, base: str, check: Check) -> None:
    d.get(base + "/")
    wait(d, lambda dr: dr.find_elements(By.CSS_SELECTOR, 'input[aria-label="micro-batch"]'))
    idle(d)
    before = d.find_element(By.CSS_SELECTOR, '[data-testid="stMetricValue"]').text
    box = d.find_element(By.CSS_SELECTOR, 'input[aria-label="micro-batch"]')
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("2", Keys.ENTER)
    moved = wait(d, lambda dr: "micro_batch" in urllib.parse.unquote(dr.current_url))
    check(moved, f"estimate: typing a micro-batch writes it into the URL ({urllib.parse.unquote(d.current_url)[-80:]})")
    idle(d)
    after = d.find_element(By.CSS_SELECTOR, '[data-testid="stMetricValue"]').text
    check(after != before, f"estimate: the peak changes with the micro-batch ({before} -> {after})")


def check_shared_link(d: webdriver.Chrome, base: str, out: Path, check: Check) -> None:
    d.get(base + "/?s=" + urllib.parse.quote(json.dumps(NO_FIT, separators=(",", ":"))))
    shown = wait(d, lambda dr: "Does not fit" in body(dr) and "Suggested changes" in body(dr))
    idle(d)
    check(shown, "shared link: a setup that does not fit is restored with its suggestions")
    banner = [e.text for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')]
    check(any("Does not fit" in b for b in banner), "shared link: the verdict is an error alert (the selector the "
          "other checks rely on finds it)")
    exceptions = d.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    check(not exceptions and "Traceback" not in body(d), "shared link: no exception")
    screenshot(d, out, "estimate-does-not-fit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check the running dashboard in headless Chromium.")
    ap.add_argument("--url", required=True, help="base URL of the running app, e.g. http://127.0.0.1:8501")
    ap.add_argument("--out", default=".ci/artifacts", help="folder for the screenshots")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = args.url.rstrip("/")
    check = Check()
    with tempfile.TemporaryDirectory(prefix="fitsim-chromium-") as profile:
        d = driver(profile)
        try:
            d.set_page_load_timeout(TIMEOUT_S)
            check_pages(d, base, out, check)
            check_widget_updates_url(d, base, check)
            check_shared_link(d, base, out, check)
        except TimeoutException as err:
            check(False, f"browser timed out: {' '.join(str(err).split())[:200]}")
        finally:
            d.quit()
    if check.failures:
        print(f"browser check: {len(check.failures)} failure(s)", file=sys.stderr)
        return 1
    print("browser check: all passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
