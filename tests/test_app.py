"""The browser app (``python -m diffllm.app``) driven in headless Chromium, as a person would use it.

The app is served on 127.0.0.1 (a free port); Selenium drives Debian's ``chromium`` through
``chromedriver``, types a prompt of the tiny validation set, sets the threshold in the form and
presses Generate. A MutationObserver in the page records every canvas it shows. The answer must be
the one ``generate_answers`` (the CLI's library call) gives for the same prompt and settings, the
canvases must be the trajectory's frames in order (all [MASK] first, each one a refinement of the
one before, the answer last), the JSON download the trajectory, and no request may leave the app's
own address. Skipped, with the reason, without Gradio (the `app` extra), Selenium or a browser
(``.ci/run`` installs them).

The docs' screenshot: ``python -m tests.test_app --ckpt RUN/checkpoints/last.ckpt --out docs/img/app.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio", reason="the app needs Gradio, the `app` extra: pip install -e '.[app]'")
pytest.importorskip("selenium", reason="the browser test needs Selenium (the dev extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from diffllm.diffusion.sampler import CACHE_MODES, FUTURE_MODES, SamplerConfig  # noqa: E402
from diffllm.diffusion.strategies import STRATEGIES  # noqa: E402
from diffllm.diffusion.trajectory import trajectories_from_json  # noqa: E402
from diffllm.inference.generation import generate_answers  # noqa: E402
from diffllm.inference.inputs import InputError  # noqa: E402
from diffllm.inference.live import frames_of  # noqa: E402
from diffllm.inference.loading import ar_baseline_model, load_quietly  # noqa: E402
from diffllm.inference.webapp import build_app, launch, read_controls, sampler_controls  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver here: apt-get install -y chromium chromium-driver (.ci/run does)",
)
REVERSE = "Reverse these words: lion fish ring house"  # a row of the tiny validation set
DELAY = 0.3  # seconds per step: every canvas stays on screen long enough to be drawn

# Recorded in the page: every canvas shown, as [frame index, comma-separated token ids], once each.
RECORDER = """
window.__frames = [];
const record = () => {
  const c = document.querySelector('#dl-live .dl-canvas');
  if (!c) return;
  const f = [Number(c.dataset.frame), c.dataset.ids];
  const last = window.__frames[window.__frames.length - 1];
  if (!last || last[0] !== f[0] || last[1] !== f[1]) window.__frames.push(f);
};
new MutationObserver(record).observe(document.body,
  {subtree: true, childList: true, attributes: true, characterData: true});
record();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(user_data_dir: str, width: int = 1280, height: int = 1000) -> webdriver.Chrome:
    """Headless Chromium that starts nothing of its own on the network, its requests logged."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={user_data_dir}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    """Every URL the page requested so far (the DevTools log's Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def set_field(driver: webdriver.Chrome, css: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, css)
    box.clear()
    box.send_keys(text)


def submit(driver: webdriver.Chrome, url: str, instruction: str, threshold: str, timeout: float = 60) -> None:
    """Open the page, start recording canvases, fill the form and press Generate."""
    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#dl-instruction textarea"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#dl-live .dl-canvas"))
    driver.execute_script(RECORDER)
    set_field(driver, "#dl-instruction textarea", instruction)
    set_field(driver, "#dl-sampler-threshold input", threshold)
    driver.find_element(By.CSS_SELECTOR, "#dl-go").click()


def answers(driver: webdriver.Chrome) -> tuple[str, str]:
    get = lambda css: driver.find_element(By.CSS_SELECTOR, css).get_attribute("value")  # noqa: E731
    return get("#dl-answer textarea"), get("#dl-ar-answer textarea")


# ----------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_quietly(tiny_run[1])


@pytest.fixture(scope="module")
def served(model) -> Iterator[str]:
    demo = build_app(model, ar_baseline_model(model, "cpu"), delay=DELAY)
    url = launch(demo, "127.0.0.1", free_port(), block=False)
    yield url
    demo.close()


@needs_browser
def test_the_page_streams_the_trajectory_and_answers_as_the_cli(served, model, tmp_path):
    overrides = {"threshold": 0.5}
    reference = generate_answers(model, [REVERSE], sampler_overrides=overrides, trajectory=True, ar=True)[0]
    trajectory = reference["trajectory"]
    driver = chromium(str(tmp_path / "profile"))
    try:
        submit(driver, served, REVERSE, "0.5")
        WebDriverWait(driver, 60).until(
            lambda d: "AR (base)" in d.find_element(By.CSS_SELECTOR, "#dl-timings").text
        )
        shown = driver.execute_script("return window.__frames")
        diffusion, ar = answers(driver)
        link = driver.find_element(By.CSS_SELECTOR, "#dl-trajectory a").get_attribute("href")
        urls = requested_urls(driver)
    finally:
        driver.quit()

    # the answers are the CLI's for the same prompt and settings
    assert diffusion == reference["answer"] and ar == reference["ar_answer"]
    # every canvas the page showed, in order: the trajectory's frames, all [MASK] first
    expected = [[f.index, ",".join(map(str, f.rows[0].canvas))] for f in frames_of(trajectory)]
    assert shown == expected
    canvases = [[int(t) for t in ids.split(",")] for _, ids in shown]
    assert set(canvases[0]) == {trajectory.mask_id} and canvases[-1] == reference["canvas"]
    for before, after in zip(canvases, canvases[1:]):  # each a refinement of the one before
        kept = [i for i, t in enumerate(before) if t != trajectory.mask_id]
        assert [after[i] for i in kept] == [before[i] for i in kept] and after != before
    # the download is the trajectory
    with urllib.request.urlopen(link) as response:
        assert trajectories_from_json(response.read().decode()) == [trajectory]
    # offline: nothing requested but from the app itself (no web fonts, no analytics, no CDN)
    # (chrome:// pages are the browser's own start page, data: and blob: never leave the page)
    origin = served.rstrip("/")
    network = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))]
    outside = [u for u in network if not u.startswith((origin, origin.replace("http", "ws", 1)))]
    assert len(network) > 5 and outside == [], outside


def test_the_controls_are_the_sampler_fields():
    controls = sampler_controls()
    assert sorted(c.name for c in controls) == sorted(f for f in SamplerConfig.__dataclass_fields__)
    assert [c.name for c in controls][:5] == ["strategy", "steps", "threshold", "block_length", "cache"]
    kinds = {c.name: (c.kind, c.optional) for c in controls}
    assert kinds["steps"] == (int, True) and kinds["threshold"] == (float, True)
    assert kinds["stop_early"] == (bool, False) and kinds["strategy"] == (str, False)
    # a dropdown wherever the sampler's field ranges list the values (a new mode needs no app change)
    choices = {c.name: c.choices for c in controls if c.choices is not None}
    assert choices == {
        "strategy": tuple(STRATEGIES),
        "cache": CACHE_MODES,
        "future_blocks": FUTURE_MODES,
        **{k: v for k, v in choices.items() if k in ("mode", "verifier", "draft")},  # h19b's, if merged
    }
    config = SamplerConfig(gen_length=8, steps=8)
    values = {c.name: getattr(config, c.name) for c in controls}
    # only what differs from the model's sampler; an empty box is null; a number box gives floats
    # (optional numbers are text boxes: a number box cannot be empty)
    values.update(steps=" 4 ", threshold="", top_k="", gen_length=8.0)
    assert read_controls(controls, [values[c.name] for c in controls], config) == {"steps": 4}
    for key, value, message in [
        ("gen_length", None, "sampler.gen_length is empty"),
        ("steps", "4.5", "sampler.steps=4.5 is not a whole number"),
        ("threshold", "high", "sampler.threshold='high' is not a number"),
    ]:
        with pytest.raises(InputError, match=message):
            read_controls(controls, [{**values, key: value}[c.name] for c in controls], config)


def test_no_ckpt_path_serves_the_newest_diffusion_run(tiny_run, tiny_ar_run, tmp_path, capsys):
    """``python -m diffllm.app`` after ``make train``: its layout, the AR-SFT baseline the newest."""
    from diffllm.cli.app import run
    from diffllm.config.resolvers import compose

    run_dir = tmp_path / "2025-01-01" / "10-00-00"
    for name, (folder, ckpt, *_) in (("diffusion", tiny_run), ("ar_sft", tiny_ar_run)):
        (run_dir / name / "checkpoints").mkdir(parents=True)
        (run_dir / name / "config.yaml").write_text((folder / "config.yaml").read_text())
        shutil.copy(ckpt, run_dir / name / "checkpoints" / "last.ckpt")
    cfg = compose([f"outputs_dir={tmp_path}", "ar=false", f"port={free_port()}"], config_name="app")
    demo, url = run(cfg, block=False)
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/config") as response:
            page = json.loads(response.read().decode())
    finally:
        demo.close()
    newest = run_dir / "diffusion" / "checkpoints" / "last.ckpt"
    assert f"# checkpoint: {newest} (the newest run)" in capsys.readouterr().out
    assert page["title"] == "diffllm: watch it denoise"  # the page is served
    with pytest.raises(InputError, match="no ckpt_path and no run checkpoint under"):
        run(compose([f"outputs_dir={tmp_path / 'none'}"], config_name="app"), block=False)


# ----------------------------------------------------------------------------------- the screenshot


def screenshot(ckpt: str, out: Path, instruction: str, threshold: str, at: float) -> None:
    """Serve ``ckpt``, submit ``instruction`` and save the page once a fraction ``at`` of the answer
    positions are committed (mid-denoising)."""
    model = load_quietly(ckpt)
    demo = build_app(model, ar_baseline_model(model, "cpu"), delay=1.0)
    url = launch(demo, "127.0.0.1", free_port(), block=False)
    driver = chromium(tempfile.mkdtemp(prefix="diffllm-chromium-"), width=1200, height=1000)
    try:
        submit(driver, url, instruction, threshold)
        while True:
            frames: list[Any] = driver.execute_script("return window.__frames")
            ids = frames[-1][1].split(",") if frames else []
            mask = str(int(model.dlm.mask_id))
            if frames and frames[-1][0] > 0 and sum(t != mask for t in ids) >= at * len(ids):
                break
            time.sleep(0.05)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
        demo.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=screenshot.__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default="docs/img/app.png")
    parser.add_argument("--instruction", default="Sort these words: snow car dog house cat leaf")
    parser.add_argument("--threshold", default="")
    parser.add_argument("--at", type=float, default=0.5)
    args = parser.parse_args()
    screenshot(args.ckpt, Path(args.out), args.instruction, args.threshold, args.at)
