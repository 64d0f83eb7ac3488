"""``segicl annotate`` in a real browser: headless system Chromium driven by Selenium (no browser or driver
download: Debian's ``chromium`` and ``chromium-driver``, installed by .ci/run). Loads the page, clicks on
the image, accepts, and checks the mask file on disk. Skips when the browser or Selenium is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from segicl.annotate.state import read_mask
from tests.annotate_helpers import write_images

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.is_file() or not (CHROMEDRIVER.is_file() or shutil.which("chromedriver")):
        pytest.skip(f"no system Chromium ({CHROMIUM}) or chromedriver ({CHROMEDRIVER}): apt install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-dev-shm-usage", "--window-size=1000,800"):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER if CHROMEDRIVER.is_file() else shutil.which("chromedriver")))
    d = webdriver.Chrome(options=opts, service=service)
    d.set_page_load_timeout(20)
    try:
        yield d
    finally:
        d.quit()


def test_click_and_accept_in_the_browser(driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.annotate_helpers import serve

    folder = tmp_path / "images"
    names = write_images(folder)
    out = tmp_path / "out"
    wait = WebDriverWait(driver, 15)

    def idle(d) -> bool:
        return d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0"

    with serve(folder, out) as (url, app):
        driver.get(url)
        wait.until(idle)
        assert "0 / 4 accepted" in driver.find_element(By.ID, "progress").text
        assert "broken.png" in driver.find_element(By.ID, "errors").text
        canvas = driver.find_element(By.ID, "canvas")
        w, h = canvas.size["width"], canvas.size["height"]
        assert w >= 256 and h >= 256  # a 64 px image is shown enlarged
        # click at image pixel (row 32, col 20): offsets are from the canvas centre
        ActionChains(driver).move_to_element_with_offset(canvas, int((20.5 / 64 - 0.5) * w), int((32.5 / 64 - 0.5) * h)).click().perform()
        wait.until(lambda d: idle(d) and int(d.find_element(By.ID, "area").get_attribute("data-area") or 0) > 0)
        assert app.session.pending["pos_points"] == [[32, 20]]
        driver.find_element(By.ID, "accept").click()
        wait.until(lambda d: idle(d) and "1 / 4 accepted" in d.find_element(By.ID, "progress").text)
        mask = read_mask(out / "masks" / "img00.png")
        assert mask.shape == (64, 64) and mask[32, 20] and not mask[5, 60] and mask.sum() > 100
        assert app.session.accepted == [names[0]] and app.session.current == names[1]
        assert names[1] in driver.find_element(By.ID, "name").text
        # the next image opens with the context's prediction; a right click is a negative point
        ActionChains(driver).move_to_element_with_offset(canvas, int((20.5 / 64 - 0.5) * w), int((32.5 / 64 - 0.5) * h)).context_click().perform()
        wait.until(lambda d: idle(d) and app.session.pending.get("neg_points") == [[32, 20]])
        assert np.count_nonzero(mask) > int(driver.find_element(By.ID, "area").get_attribute("data-area"))
        # box mode (key 2): a drag is a box; Z undoes it; erase mode (key 4) removes the point under the brush
        def at(row: int, col: int) -> tuple[int, int]:
            return int(((col + 0.5) / 64 - 0.5) * w), int(((row + 0.5) / 64 - 0.5) * h)

        def keys(k: str) -> None:
            ActionChains(driver).send_keys(k).perform()

        keys("2")
        x0, y0 = at(10, 10)
        x1, y1 = at(40, 50)
        ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold().move_by_offset(
            (x1 - x0) // 2, (y1 - y0) // 2).move_by_offset(x1 - x0 - (x1 - x0) // 2, y1 - y0 - (y1 - y0) // 2).release().perform()
        wait.until(lambda d: idle(d) and app.session.pending.get("boxes") == [[10, 10, 40, 50]])
        keys("z")
        wait.until(lambda d: idle(d) and app.session.pending.get("boxes") == [])
        keys("4")
        ActionChains(driver).move_to_element_with_offset(canvas, *at(32, 21)).click().perform()
        wait.until(lambda d: idle(d) and app.session.pending.get("neg_points") == [])
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs
