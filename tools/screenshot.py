"""Take a screenshot of the dashboard: ``python tools/screenshot.py [--out PNG]``.

Starts ``trioagg serve`` on a fresh SQLite store in a temporary folder, sends it a week
of made-up shop and API events ending now, opens the dashboard in Debian's headless
Chromium (``CHROMIUM``, default /usr/bin/chromium) through Playwright, and saves a PNG:
by default ``build/dashboard.png``, which git ignores, so a look at the page never
changes the README's picture; ``--out docs/dashboard.png`` updates that. The events are
drawn from a fixed seed.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
#: Ignored by git (``build/`` in .gitignore): the tracked picture is docs/dashboard.png.
DEFAULT_OUT = ROOT / "build" / "dashboard.png"
VIEW = "key=checkout.completed&range=7d&granularity=hour&stats=count&group_by=region&fill=null"
REGIONS = {"eu": 1.0, "us": 0.8, "apac": 0.35}


def events(now: float) -> list[dict[str, object]]:
    """A week of hourly traffic with a daily rhythm, ending at ``now``."""
    rng = random.Random(11)
    made: list[dict[str, object]] = []
    start = int(now // 3600 * 3600) - 7 * 86400
    for hour in range(start, int(now), 3600):
        daily = 0.55 + 0.45 * math.sin((hour / 3600 % 24 - 8) / 24 * 2 * math.pi)
        for region, share in REGIONS.items():
            for _ in range(int(40 * share * daily + rng.random() * 6)):
                ts = min(now, hour + rng.random() * 3600)
                amount = round(rng.lognormvariate(3.4, 0.6), 2)
                plan = rng.choice(["free", "pro", "pro", "team"])
                made.append(
                    {
                        "key": "checkout.completed",
                        "ts": ts,
                        "value": amount,
                        "tags": {"region": region, "plan": plan},
                        "distinct_id": f"user-{rng.randrange(400)}",
                    }
                )
                made.append({"key": "checkout.started", "ts": ts, "tags": {"region": region}})
        for endpoint in ("/v1/cart", "/v1/pay", "/v1/search"):
            for _ in range(int(30 * daily) + 1):
                latency = rng.lognormvariate(4.2 if endpoint == "/v1/pay" else 3.5, 0.5)
                made.append(
                    {
                        "key": "api.latency_ms",
                        "ts": hour + rng.random() * 3600,
                        "value": round(latency, 1),
                        "tags": {"endpoint": endpoint},
                    }
                )
    for name in ("page.view", "signup.completed", "sensor.temperature", "queue.wait_ms"):
        for hour in range(start, int(now), 3 * 3600):
            made.append({"key": name, "ts": hour + 60, "value": round(rng.uniform(1, 30), 1)})
    return [event for event in made if float(event["ts"]) <= now]  # type: ignore[arg-type]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Take a screenshot of the dashboard.")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="the PNG to write (default build/dashboard.png; the README's is docs/dashboard.png)",
    )
    return parser.parse_args(argv)


def main() -> None:
    out: Path = parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "trioagg", "serve", "--port", "0"]
        command += ["--db", f"{folder}/shop.db", "--quantiles", "api.*", "--log-level", "info"]
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert server.stderr is not None
            url = ""
            for line in server.stderr:
                found = re.search(r"Running on (http://[\d.]+:\d+)", line)
                if found:
                    url = found[1]
                    break
            if not url:
                raise SystemExit("trioagg serve did not start")
            made = events(time.time())
            with httpx.Client(base_url=url, timeout=60) as client:
                for first in range(0, len(made), 10_000):
                    client.post("/v1/events", json=made[first : first + 10_000]).raise_for_status()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium)
                page = browser.new_page(viewport={"width": 1440, "height": 820})
                page.goto(f"{url}/?{VIEW}")
                page.wait_for_function("() => window.dashboard.loads > 0 && window.dashboard.chart")
                # a trickle of orders until the second status answer, for an ingest rate
                order = {"key": "checkout.completed", "value": 31.5, "tags": {"region": "eu"}}
                with httpx.Client(base_url=url, timeout=60) as client:
                    for _ in range(22):
                        client.post("/v1/events", json=[order] * 3).raise_for_status()
                        page.wait_for_timeout(250)
                box = page.locator("#chart .u-over").bounding_box()
                assert box is not None
                page.mouse.move(box["x"] + box["width"] * 0.83, box["y"] + box["height"] * 0.4)
                page.screenshot(path=str(out), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(30)
    print(f"{out}: {len(made)} events")


if __name__ == "__main__":
    main()
