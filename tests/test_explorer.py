"""The latent explorer page in a real headless Chromium (Selenium, Debian's chromium + chromedriver) against the
real `vaelab serve` on a free 127.0.0.1 port.

Tiny runs trained on digits (1 epoch): an MLP VAE with a 2-D latent (the map shows the latent means as they
are), one with an 8-D latent (the map is their PCA plane) and a CVAE (a class selector). The tests click and
drag on the map at known canvas pixels and read the decoded canvas's pixels back (getImageData): they must be
model.decode at the latent point the page reports, drawn as round(255 x) per pixel, and that point must be
the projection of the clicked pixel (latent = mean + x components[0] + y components[1], with (x, y) the
pixel in the page's view). The interpolation strip has the asked number of frames, each one decode of its
latent; a CVAE's class selector changes the image to decode(z, label). The slow test measures first paint
and pointer-driven decode latency on MNIST's 10,000-point test split.

Screenshots are saved in each test's tmp dir; set VAELAB_SHOTS=DIR to have copies written there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MNIST = Path(os.environ.get("VAELAB_DATA", "/work/shared/data"))
RUNS = {  # kind: `vaelab train` flags (digits, 1 epoch)
    "vae2": ["--model", "vae", "--arch", "mlp", "--latent-dim", "2"],
    "vae8": ["--model", "vae", "--arch", "mlp", "--latent-dim", "8"],
    "cvae": ["--model", "cvae", "--arch", "mlp", "--latent-dim", "2"],
    "vqvae": ["--model", "vqvae", "--codebook-size", "16"],
    # colour: the emoji images (64x64 RGB on white) read at 16x16, as a user's own folder would be
    "rgb": ["--model", "vae", "--arch", "mlp", "--latent-dim", "2", "--dataset", str(MNIST / "emoji"),
            "--image-size", "16"],
}
HALF_LEVEL = 0.5 / 255 + 1e-6  # the page draws round(255 x): a pixel is within half a level of 255 x

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")


# ============================================================================================== fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kind -> run directory, each trained the first time a test asks for it."""
    from vaelab.cli import main

    root, runs = tmp_path_factory.mktemp("explorer-runs"), {}

    def get(kind: str) -> Path:
        if kind not in runs:
            out = root / kind
            assert main(["train", *RUNS[kind], "--epochs", "1", "--batch-size", "64", "--out", str(out),
                         "--no-pictures", "--no-progress"]) == 0
            runs[kind] = out
        return runs[kind]

    return get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vaelab serve RUN --port P [FLAGS]` as a child process, up once /api/info answers."""

    def __init__(self, run: Path, *flags: str, token: str | None = None, timeout: float = 120):
        self.port = free_port()
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-m", "vaelab", "serve", str(run), "--port", str(self.port), *flags]
        if token:
            args += ["--token", token]
        self.log = open(Path(run) / f"serve-{self.port}.log", "w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("api/info")
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    self.stop()
                    raise RuntimeError(f"`vaelab serve` did not come up:\n{self.log.read()}")
                time.sleep(0.2)

    def get(self, path: str):
        request = urllib.request.Request(self.url + path)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def serve(trained):
    """kind -> a running Server of that run (one per kind and module)."""
    servers = {}

    def get(kind: str) -> Server:
        if kind not in servers:
            servers[kind] = Server(trained(kind))
        return servers[kind]

    yield get
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    d.set_script_timeout(30)
    yield d
    d.quit()


@pytest.fixture
def shot(driver, tmp_path, request):
    """shot(name): a screenshot of the page in the test's tmp dir (and in $VAELAB_SHOTS, when set)."""

    def take(name: str) -> Path:
        path = tmp_path / f"{request.node.name}-{name}.png"
        assert driver.save_screenshot(str(path))
        if os.environ.get("VAELAB_SHOTS"):
            Path(os.environ["VAELAB_SHOTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(os.environ["VAELAB_SHOTS"]) / path.name)
        return path

    return take


# =============================================================================================== helpers


def state(driver, expr: str = "s"):
    """A JSON-able expression of the page's state `s` (window.explorer.state)."""
    return driver.execute_script(f"const s = window.explorer.state, v = ({expr});"
                                 "return v === undefined ? null : JSON.parse(JSON.stringify(v));")


def settled(driver, timeout: float = 30) -> None:
    """Wait until the page is up and the decoded image is that of the latest latent point."""
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(
        "const s = window.explorer && window.explorer.state;"
        "return !!(s && s.ready && !s.busy && s.shownZ && JSON.stringify(s.shownZ) === JSON.stringify(s.z));"))


def open_page(driver, server: Server, query: str = "") -> None:
    driver.get(server.url + query)
    try:
        settled(driver)
    except TimeoutException:
        error = driver.find_element(By.ID, "error").text
        raise AssertionError(f"the page did not settle; its error line says {error!r}") from None
    assert driver.find_element(By.ID, "error").text == ""


def click_map(driver, dx: int, dy: int, shift: bool = False) -> None:
    """Click the map `dx, dy` CSS pixels from its centre (shift-click: an interpolation end)."""
    canvas = driver.find_element(By.ID, "map")
    chain = ActionChains(driver).move_to_element_with_offset(canvas, dx, dy)
    if shift:
        chain = chain.key_down(Keys.SHIFT).click().key_up(Keys.SHIFT)
    else:
        chain = chain.click()
    chain.perform()


def canvas_pixels(driver, selector: str) -> dict:
    """The RGBA bytes of a canvas, read back with getImageData."""
    return driver.execute_script("""
        const c = document.querySelector(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return {width: c.width, height: c.height, data: Array.from(d)};""", selector)


def image_of(pixels: dict, shape) -> np.ndarray:
    """The (H, W, 3) image a canvas shows at an integer scale: every block must be one colour."""
    _, H, W = shape
    rgba = np.asarray(pixels["data"], dtype=np.uint8).reshape(pixels["height"], pixels["width"], 4)
    scale = pixels["width"] // W
    assert pixels["width"] == W * scale and pixels["height"] == H * scale and scale >= 1
    assert (rgba[..., 3] == 255).all()
    blocks = rgba[..., :3].reshape(H, scale, W, scale, 3)
    assert (blocks == blocks[:, :1, :, :1]).all(), "a pixel is drawn with more than one colour (smoothing?)"
    return blocks[:, 0, :, 0].astype(np.float64)  # (H, W, 3)


def assert_shows(image: np.ndarray, x: torch.Tensor) -> None:
    """The page's pixels are x (C,H,W in [0,1]) drawn as round(255 x): within half a level, grey = R = G = B."""
    x = x.detach().double().clamp(0, 1).numpy()
    expected = np.repeat(x[0][..., None], 3, axis=-1) if x.shape[0] == 1 else x.transpose(1, 2, 0)
    diff = np.abs(image / 255 - expected)
    assert diff.max() <= HALF_LEVEL, f"the page's pixels differ from model.decode by up to {diff.max() * 255:.3f} levels"


def load_model(run: Path):
    from vaelab.models import from_pretrained

    return from_pretrained(run).eval()


def decode(model, z, label: int | None = None) -> torch.Tensor:
    """model.decode at one latent point (a flat list) as the server takes it: float32, one row."""
    z = torch.tensor([z], dtype=torch.float32)  # (1, latent_dim)
    condition = None if label is None else torch.tensor([label])
    with torch.no_grad():
        return model.decode(z, condition)[0]


def projected(view: dict, projection: dict, u: float, v: float) -> np.ndarray:
    """The latent point of map pixel (u, v): the page's view, then mean + x components[0] + y components[1]."""
    x = view["cx"] + (u / view["size"] - 0.5) * view["span"]
    y = view["cy"] - (v / view["size"] - 0.5) * view["span"]
    components = np.asarray(projection["components"], dtype=np.float64)
    return np.asarray(projection["mean"], dtype=np.float64) + x * components[0] + y * components[1]


def map_origin(driver) -> tuple[float, float]:
    """The map canvas's centre in canvas pixels (where ActionChains' offsets start)."""
    return driver.execute_script("""
        const c = document.getElementById('map'), r = c.getBoundingClientRect();
        return [Math.floor(r.width / 2) * c.width / r.width, Math.floor(r.height / 2) * c.height / r.height];""")


# ================================================================================================= tests


@pytest.mark.parametrize("kind", ["vae2", "vae8"])
def test_a_click_shows_the_decoded_projection_of_the_clicked_pixel(kind, serve, trained, driver, shot):
    server = serve(kind)
    model = load_model(trained(kind))
    open_page(driver, server)
    latent_map = server.get("api/latent-map?n=10000")
    assert latent_map["projection"]["kind"] == ("identity" if kind == "vae2" else "pca")
    page_map = state(driver, "s.map")
    assert page_map["points"] == latent_map["points"] and page_map["projection"] == latent_map["projection"]
    view = state(driver, "s.view")
    assert view["size"] == 560 == int(driver.find_element(By.ID, "map").get_attribute("width"))

    u0, v0 = map_origin(driver)
    for dx, dy in [(0, 0), (-150, 90), (120, -200), (251, 251)]:
        click_map(driver, dx, dy)
        settled(driver)
        pointer = state(driver, "s.pointer")
        assert abs(pointer["u"] - (u0 + dx)) <= 1 and abs(pointer["v"] - (v0 + dy)) <= 1  # where we clicked
        z = np.asarray(state(driver, "s.z"))
        np.testing.assert_allclose(z, projected(view, latent_map["projection"], pointer["u"], pointer["v"]),
                                   rtol=0, atol=1e-12)
        assert json.loads(driver.find_element(By.ID, "decoded").get_attribute("data-z")) == list(z)
        assert_shows(image_of(canvas_pixels(driver, "#decoded"), model.config.input_shape), decode(model, list(z)))
    shot("after-clicks")


def test_hovering_a_point_shows_its_test_image(serve, driver, shot):
    server = serve("vae2")
    open_page(driver, server)
    i = 17
    u, v = driver.execute_script("return window.explorer.toCanvas(...window.explorer.state.map.points[arguments[0]]);", i)
    u0, v0 = map_origin(driver)
    ActionChains(driver).move_to_element_with_offset(driver.find_element(By.ID, "map"), round(u - u0),
                                                     round(v - v0)).perform()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "tooltip").is_displayed())
    thumb = driver.find_element(By.ID, "thumb")
    row = int(thumb.get_attribute("data-row"))  # the nearest point to the pointer: this one or a neighbour
    near = driver.execute_script("return window.explorer.toCanvas(...window.explorer.state.map.points[arguments[0]]);",
                                 row)
    assert (near[0] - u) ** 2 + (near[1] - v) ** 2 <= 2 * 1.0 ** 2 + 1e-9 or row == i
    assert thumb.get_attribute("src").endswith(f"/api/test-image/{row}")
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return arguments[0].complete && "
                                                               "arguments[0].naturalWidth === 8;", thumb))
    assert driver.find_element(By.ID, "tip-text").text.startswith(f"test #{row}")
    shot("hover")


def test_a_drag_is_followed_to_its_last_point(serve, trained, driver):
    server = serve("vae2")
    model = load_model(trained("vae2"))
    open_page(driver, server)
    canvas = driver.find_element(By.ID, "map")
    chain = ActionChains(driver).move_to_element_with_offset(canvas, -200, -200).click_and_hold()
    for _ in range(20):
        chain = chain.move_by_offset(19, 17)
    chain.release().perform()
    settled(driver)
    s = state(driver, "{z: s.z, pointer: s.pointer, view: s.view, decodes: s.perf.decodes.length}")
    u0, v0 = map_origin(driver)
    assert abs(s["pointer"]["u"] - (u0 - 200 + 20 * 19)) <= 1 and abs(s["pointer"]["v"] - (v0 - 200 + 20 * 17)) <= 1
    np.testing.assert_allclose(s["z"], projected(s["view"], state(driver, "s.map.projection"), s["pointer"]["u"],
                                                 s["pointer"]["v"]), rtol=0, atol=1e-12)
    assert 2 <= s["decodes"]  # the start point and at least the drag's last one (the ones between may be dropped)
    assert_shows(image_of(canvas_pixels(driver, "#decoded"), model.config.input_shape), decode(model, s["z"]))


def set_steps(driver, steps: int) -> None:
    box = driver.find_element(By.ID, "steps")
    box.clear()
    box.send_keys(str(steps), Keys.TAB)  # the change event fires when the box loses the focus


def wait_strip(driver, steps: int) -> None:
    WebDriverWait(driver, 30, poll_frequency=0.05).until(
        lambda d: d.execute_script("const s = window.explorer.state; return !!(s.strip && s.strip.steps === "
                                   f"{steps}) && document.querySelectorAll('#strip canvas.frame').length === {steps};"))


@pytest.mark.parametrize("kind", ["vae2", "vae8"])
def test_the_interpolation_strip_has_the_asked_frames_each_a_decode(kind, serve, trained, driver, shot):
    server = serve(kind)
    model = load_model(trained(kind))
    open_page(driver, server)
    set_steps(driver, 5)
    click_map(driver, -270, 270, shift=True)  # the corners of the square view: beyond the points' reach
    click_map(driver, 270, -270, shift=True)
    wait_strip(driver, 5)
    ends = state(driver, "s.ends")
    assert [e["index"] for e in ends] == [None, None]
    for steps in (5, 12):
        if steps != 5:
            set_steps(driver, steps)
            wait_strip(driver, steps)
        strip = state(driver, "s.strip")
        assert strip["frames"] == steps and len(strip["z"]) == steps
        np.testing.assert_allclose(strip["z"][0], ends[0]["z"], rtol=0, atol=1e-6)  # float32 on the way back
        np.testing.assert_allclose(strip["z"][-1], ends[1]["z"], rtol=0, atol=1e-6)
        for k in range(steps):
            image = image_of(canvas_pixels(driver, f"#strip canvas.frame:nth-child({k + 1})"),
                             model.config.input_shape)
            assert_shows(image, decode(model, strip["z"][k]))
    assert driver.find_element(By.ID, "error").text == ""  # typing a number passes through an empty box
    shot("strip")
    set_steps(driver, 1)
    WebDriverWait(driver, 10).until(lambda d: "steps must be an integer of at least 2, got 1"
                                    in d.find_element(By.ID, "error").text)
    assert state(driver, "s.strip.frames") == 12  # the last good strip stays


def test_two_test_images_are_interpolated_by_their_codes(serve, trained, driver):
    """Shift-clicks on two test points: the strip runs between those rows' codes (index0, index1)."""
    server = serve("vae8")
    open_page(driver, server)
    rows = driver.execute_script("""
        const s = window.explorer.state, out = [];
        for (const i of [3, 40]) out.push(window.explorer.toCanvas(...s.map.points[i]));
        return out;""")
    u0, v0 = map_origin(driver)
    for u, v in rows:
        click_map(driver, round(u - u0), round(v - v0), shift=True)
    wait_strip(driver, 8)
    ends = state(driver, "s.ends")
    assert all(e["index"] is not None for e in ends)
    strip = state(driver, "s.strip")
    assert strip["body"]["index0"] == ends[0]["index"] and strip["body"]["index1"] == ends[1]["index"]
    assert strip["frames"] == 8


def test_the_class_selector_decodes_with_the_chosen_label(serve, trained, driver, shot):
    server = serve("cvae")
    model = load_model(trained("cvae"))
    open_page(driver, server)
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#label option")]
    assert options == [str(k) for k in range(10)]
    click_map(driver, 60, -40)
    settled(driver)
    z = state(driver, "s.z")
    images = {}
    for label in (0, 3, 7):
        Select(driver.find_element(By.ID, "label")).select_by_value(str(label))
        WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d, label=label: d.find_element(
            By.ID, "decoded").get_attribute("data-label") == str(label))
        settled(driver)
        images[label] = image_of(canvas_pixels(driver, "#decoded"), model.config.input_shape)
        assert_shows(images[label], decode(model, z, label))
    assert not np.array_equal(images[0], images[3]) and not np.array_equal(images[3], images[7])
    shot("label-7")


def test_sliders_are_sorted_by_kl_and_move_the_point(serve, trained, driver):
    server = serve("vae8")
    model = load_model(trained("vae8"))
    open_page(driver, server)
    kl = server.get("api/kl")
    sliders = driver.find_elements(By.CSS_SELECTOR, "#sliders input[type=range]")
    assert [int(s.get_attribute("data-dim")) for s in sliders] == kl["dims"]
    before = state(driver, "s.z")
    top = sliders[0]
    top.send_keys(Keys.END)  # the slider's maximum: the prior's +3 standard deviations
    settled(driver)
    after = state(driver, "s.z")
    dim = kl["dims"][0]
    assert after[dim] == float(top.get_attribute("max")) == 3
    assert [a for d, a in enumerate(after) if d != dim] == [b for d, b in enumerate(before) if d != dim]
    assert_shows(image_of(canvas_pixels(driver, "#decoded"), model.config.input_shape), decode(model, after))

    # the traversal strip: the point with the dimension of the slider moved last set to -3 .. 3 in turn
    second = kl["dims"][1]
    sliders[1].send_keys(Keys.HOME)  # the slider's minimum: -3
    settled(driver)
    after = state(driver, "s.z")
    assert after[second] == -3 and after[dim] == 3
    WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: state(
        d, f"!!(s.traversal && s.traversal.dim === {second} && Math.abs(s.traversal.z[0][{dim}] - 3) < 1e-6)"))
    traversal = state(driver, "s.traversal")
    dim = second
    values = [-3, -2.25, -1.5, -0.75, 0, 0.75, 1.5, 2.25, 3]
    assert traversal["frames"] == len(values) == len(driver.find_elements(By.CSS_SELECTOR, "#traverse-strip canvas"))
    for k, value in enumerate(values):
        expected = list(after)
        expected[dim] = value
        np.testing.assert_allclose(traversal["z"][k], expected, rtol=0, atol=1e-6)  # float32 on the way back
        image = image_of(canvas_pixels(driver, f"#traverse-strip canvas:nth-child({k + 1})"), model.config.input_shape)
        assert_shows(image, decode(model, traversal["z"][k]))


def test_a_token_server_works_through_the_page_address(trained, driver):
    server = Server(trained("vae2"), token="s3cret-t0ken")
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url, timeout=30)
        assert e.value.code == 401
        open_page(driver, server, "?token=s3cret-t0ken")  # the page and its fetches carry the token
        assert state(driver, "s.map.points.length") == 180
    finally:
        server.stop()


def test_the_run_record_is_shown(serve, driver):
    server = serve("vae2")
    open_page(driver, server)
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#metric option"))
    metrics = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#metric option")]
    assert "train_loss" in metrics and not any(m.startswith("val_") for m in metrics)
    assert driver.find_element(By.ID, "metric").get_attribute("value") == "train_loss"
    pixels = canvas_pixels(driver, "#curves")
    rgba = np.asarray(pixels["data"], dtype=np.uint8).reshape(pixels["height"], pixels["width"], 4)
    assert (rgba[..., :3] != 255).any(axis=-1).sum() > 100  # something is drawn


def test_the_score_histogram_flags_the_rows_above_the_threshold(serve, driver, shot):
    server = serve("vae2")
    open_page(driver, server)
    info = server.get("api/info")
    assert driver.find_element(By.ID, "scores-panel").is_displayed()
    time.sleep(0.5)
    assert state(driver, "s.scores") is None  # scored only when the panel is opened: it keeps the model busy
    driver.find_element(By.CSS_SELECTOR, "#scores-details summary").click()
    WebDriverWait(driver, 60).until(lambda d: state(d, "!!(s.scores && s.scores.threshold !== null)"))
    scores = np.asarray(server.get(f"api/scores?kind={info['default_score']}")["score"])
    n = len(scores)
    slider = driver.find_element(By.ID, "threshold")
    for key, quantile in [(None, 0.95), (Keys.HOME, 0.0), (Keys.END, 1.0)]:
        if key is not None:
            slider.send_keys(key)
        page = state(driver, "{kind: s.scores.kind, threshold: s.scores.threshold, flagged: s.scores.flagged, "
                             "top: s.scores.top}")
        assert page["kind"] == info["default_score"]
        assert page["threshold"] == np.sort(scores)[min(n - 1, int(np.floor(quantile * n)))]
        flagged = scores >= page["threshold"]
        assert page["flagged"] == flagged.sum()
        expected_top = [i for i in np.argsort(-scores, kind="stable") if flagged[i]][:12]
        assert sorted(page["top"]) == sorted(expected_top)  # the highest flagged rows (ties in any order)
        shown = driver.find_elements(By.CSS_SELECTOR, "#anomalies img")
        assert len(shown) == min(12, flagged.sum())
        if key is None:
            shot("scores")
    assert state(driver, "s.scores.flagged") == (scores == scores.max()).sum()


def test_a_conditional_model_has_no_score_panel(serve, driver):
    open_page(driver, serve("cvae"))
    assert not driver.find_element(By.ID, "scores-panel").is_displayed()


def test_painting_a_code_decodes_the_edited_grid(serve, trained, driver, shot):
    """A VQ-VAE's code grid is that of test image 0 (its PNG, as the page sends it); a painted cell changes the
    grid, and the image beside it is decode_indices of the edited grid."""
    from PIL import Image

    server = serve("vqvae")
    model = load_model(trained("vqvae"))
    open_page(driver, server)
    assert driver.find_element(By.ID, "codes-panel").is_displayed()
    idle = "!!(s.codesShown && !s.codesBusy && JSON.stringify(s.codesShown) === JSON.stringify(s.codes))"
    WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: state(d, idle))
    with urllib.request.urlopen(server.url + "api/test-image/0", timeout=30) as r:
        png = np.asarray(Image.open(r), dtype=np.float32) / 255  # (H, W): the digits are grey
    with torch.no_grad():
        codes = model.encode_indices(torch.from_numpy(png)[None, None])[0]  # (h, w)
    assert state(driver, "s.codes") == codes.tolist()
    h, w = codes.shape
    for (i, j), code in [((0, 0), (int(codes[0, 0]) + 5) % 16), ((h - 1, w - 1), (int(codes[-1, -1]) + 9) % 16)]:
        box = driver.find_element(By.ID, "paint-code")
        box.clear()
        box.send_keys(str(code))
        grid = driver.find_element(By.ID, "code-grid")
        cell = int(grid.get_attribute("width")) // w
        ActionChains(driver).move_to_element_with_offset(grid, int((j + 0.5 - w / 2) * cell),
                                                         int((i + 0.5 - h / 2) * cell)).click().perform()
        codes[i, j] = code
        WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: state(d, idle))
        assert state(driver, "s.codesShown") == codes.tolist()
        with torch.no_grad():
            expected = model.decode_indices(codes[None])[0]
        assert_shows(image_of(canvas_pixels(driver, "#code-decoded"), model.config.input_shape), expected)
    shot("painted")


# ======================================================================================== vaelab explore


def explore(run: Path, out: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """`vaelab explore RUN` with BROWSER set to headless Chromium dumping the page's DOM once its scripts ran
    (webbrowser runs $BROWSER with the address for %s): the browser's output lands in `out` with explore's."""
    port = free_port()
    browser = (f"{CHROMIUM} --headless=new --no-sandbox --disable-gpu --virtual-time-budget=10000 "
               f"--user-data-dir={out.parent / 'chromium-profile'} --dump-dom %s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "BROWSER": browser}
    log = open(out, "w")  # noqa: SIM115 - the child's output, for its lifetime
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "explore", str(run), "--port", str(port), *flags],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        assert proc.poll() is None, f"vaelab explore exited with {proc.returncode}:\n{content}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in vaelab explore's output:\n{path.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_explore_opens_the_page_in_the_browser(trained, tmp_path):
    """The browser (headless Chromium, via $BROWSER) gets the page's address once the server listens; the DOM
    it dumps is the explorer's after its scripts ran: the run's name and the latent map's caption are in it."""
    run = trained("vae2")
    proc, port = explore(run, tmp_path / "explore.log", "--token", "t0k3n")
    try:
        out = wait_for(tmp_path / "explore.log", "opened the explorer", proc)  # webbrowser waits for the dump
        assert f"opened the explorer in your browser: http://127.0.0.1:{port}/?token=t0k3n" in out
        assert f'<span id="run-info">{run.name} · vae on digits' in out
        assert "180 test points · the latent means" in out
    finally:
        stop(proc)


def test_explore_no_browser_prints_the_address_only(trained, tmp_path):
    run = trained("vae2")
    proc, port = explore(run, tmp_path / "explore.log", "--no-browser")
    try:
        out = wait_for(tmp_path / "explore.log", "the explorer: ", proc)
        assert f"the explorer: http://127.0.0.1:{port}/\n" in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:  # the server runs
            assert b"vaelab explorer" in r.read()
        time.sleep(3)
        assert "<html" not in (tmp_path / "explore.log").read_text()  # no browser ran
    finally:
        stop(proc)


def test_explore_refuses_a_public_address_without_a_token(trained):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "vaelab", "explore", str(trained("vae2")), "--host", "0.0.0.0",
                           "--no-browser"], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--host 0.0.0.0" in done.stderr and "--token" in done.stderr


# ============================================================================== a 10,000-point latent map


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "mnist").is_dir(), reason=f"needs MNIST in {MNIST}/mnist (see docs/data.md)")
def test_a_10000_point_map_stays_usable(tmp_path, driver, shot, capsys):
    """MNIST's 10,000 test images on the map of a 2-D VAE trained briefly: first paint and the latency of
    pointer-driven decoding, measured in the page with performance.now() (printed, and in timings.json)."""
    from vaelab.cli import main

    run = tmp_path / "mnist-vae2"
    assert main(["train", "--model", "vae", "--arch", "mlp", "--latent-dim", "2", "--dataset", "mnist",
                 "--data-dir", str(MNIST), "--epochs", "1", "--batch-size", "256", "--out", str(run),
                 "--no-pictures", "--no-progress"]) == 0
    model = load_model(run)
    server = Server(run)
    try:
        open_page(driver, server)
        perf = state(driver, "s.perf")
        assert state(driver, "s.map.points.length") == 10000
        first_paint = perf["firstPaint"]  # ms since the page's navigation started
        map_draw = perf["firstPaint"] - perf["mapLoaded"]
        shot("mnist-map")
        canvas = driver.find_element(By.ID, "map")
        start = len(perf["decodes"])
        chain = ActionChains(driver).move_to_element_with_offset(canvas, -200, -150).click_and_hold()
        for _ in range(40):
            chain = chain.move_by_offset(10, 7).pause(0.02)
        chain.release().perform()
        settled(driver)
        latencies = np.asarray(state(driver, "s.perf.decodes")[start:])
        z = state(driver, "s.z")
        assert_shows(image_of(canvas_pixels(driver, "#decoded"), model.config.input_shape), decode(model, z))
        shot("mnist-dragged")
    finally:
        server.stop()

    # the data moved (an empty --data-dir): no map points, but the page decodes the plane of z[0] and z[1]
    server = Server(run, "--data-dir", str(tmp_path / "no-data"))
    try:
        driver.get(server.url)
        WebDriverWait(driver, 30).until(lambda d: state(d, "!!(s.ready && s.shownZ && !s.busy)"))
        assert "test split" in driver.find_element(By.ID, "error").text
        assert state(driver, "s.map.points.length") == 0
        click_map(driver, 100, -50)
        settled(driver)
        s = state(driver, "{z: s.z, pointer: s.pointer, view: s.view}")
        np.testing.assert_allclose(s["z"], projected(s["view"], {"mean": [0, 0], "components": [[1, 0], [0, 1]]},
                                                     s["pointer"]["u"], s["pointer"]["v"]), rtol=0, atol=1e-12)
        assert_shows(image_of(canvas_pixels(driver, "#decoded"), model.config.input_shape), decode(model, s["z"]))
        shot("no-data")
    finally:
        server.stop()
    timings = {"points": 10000, "first_paint_ms": first_paint, "map_draw_ms": map_draw,
               "decodes": len(latencies), "decode_p50_ms": float(np.median(latencies)),
               "decode_p90_ms": float(np.percentile(latencies, 90)), "decode_max_ms": float(latencies.max())}
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=1))
    with capsys.disabled():
        print("\nexplorer on a 10,000-point map:", json.dumps(timings))
    assert len(latencies) >= 5
    assert map_draw < 1000 and first_paint < 10000
    assert timings["decode_p50_ms"] < 250


@pytest.mark.skipif(not (MNIST / "emoji").is_dir(), reason=f"the emoji folder is not in {MNIST}")
def test_a_colour_run_shows_its_decoded_rgb_pixels_and_test_images(serve, trained, driver, shot):
    """An RGB model: each channel of the decoded canvas is the model's decode of that channel (not a grey
    image), and a test point's thumbnail is the test image at the run's --image-size."""
    server = serve("rgb")
    model = load_model(trained("rgb"))
    assert tuple(model.config.input_shape) == (3, 16, 16)
    open_page(driver, server)
    for dx, dy in [(0, 0), (-120, 80), (140, -160)]:
        click_map(driver, dx, dy)
        settled(driver)
        z = state(driver, "s.z")
        image = image_of(canvas_pixels(driver, "#decoded"), model.config.input_shape)
        expected = decode(model, z)
        assert_shows(image, expected)
        # a colour picture: the channels differ where the model's do (grey would have R = G = B everywhere)
        spread = float((expected.max(0).values - expected.min(0).values).max())
        assert spread > 0.05 and float(np.ptp(image, axis=2).max()) > 0.05 * 255 - 1
    shot("rgb")
    with urllib.request.urlopen(server.url + "api/test-image/0", timeout=30) as r:
        from PIL import Image
        import io

        thumb = Image.open(io.BytesIO(r.read()))
    assert thumb.size == (16, 16) and thumb.mode == "RGB"
