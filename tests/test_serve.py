"""``ddfm-fast serve``: the job manager on its own, the HTTP layer, and the page end to end in headless Chromium.

The browser tests start the real command (``python -m ddfm_fast serve --port 0``) in a subprocess on loopback and
drive the page with Playwright through the system's Chromium (Debian's ``chromium`` package; Playwright's own
browser download is not used). They skip, saying what is missing, when the ``web`` extra, Playwright or Chromium
is absent. Inputs are 128x96 crops of the shipped MSRS pair (``ddfm_fast.samples``), fused with the shipped prior,
so a run of a few steps takes about a second on a 2-core CPU.
"""

from __future__ import annotations

import http.client
import io as bytesio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from browser import chromium  # noqa: E402 (tests/browser.py)
from ddfm_fast import api, io
from ddfm_fast.config import AccelConfig, SamplerConfig
from ddfm_fast.metrics import METRIC_NAMES, evaluate, read_gray_eval
from ddfm_fast.sampler import NonFiniteError
from ddfm_fast.web.jobs import (JobManager, JobRequest, Limits, QueueFull, RequestError, UploadError, UploadTooLarge,
                                display_name)

CROP = (0, 0, 128, 96)  # left, top, right, bottom: small enough for seconds on a CPU, above VIF's 65x65 minimum
SERVER_START_S = 180  # importing torch and loading the prior on a loaded 2-core machine


def _have_web_extra() -> bool:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


needs_web = pytest.mark.skipif(not _have_web_extra(),
                               reason="the web extra is not installed (pip install -e '.[web]')")


# --------------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small crops of the shipped infrared / visible pair, a partner of another size, and a truncated PNG."""
    from ddfm_fast.samples import example_pair

    folder = tmp_path_factory.mktemp("serve_inputs")
    out = {}
    for key, src in zip(("ir", "vis"), example_pair("ivf")):
        out[key] = folder / f"{key}.png"
        Image.open(src).crop(CROP).save(out[key])
    out["vis_small"] = folder / "vis_small.png"
    Image.open(example_pair("ivf")[1]).crop((0, 0, 100, 96)).save(out["vis_small"])
    out["broken"] = folder / "broken.png"
    out["broken"].write_bytes(out["ir"].read_bytes()[:300])  # a PNG cut off inside its image data
    return out


# --------------------------------------------------------------------------------------------------- job manager


class _NaNModel(nn.Module):
    """A 'UNet' whose epsilon is NaN everywhere: the sampler must report a non-finite result."""

    default_steps = 3

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float("nan"))


def _wait_final(manager: JobManager, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = manager.snapshot(manager.get(job_id))
        if snap["state"] in ("done", "error", "cancelled"):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s")


def test_display_name_is_a_label_never_a_path() -> None:
    assert display_name("../../etc/passwd", "x") == "passwd"
    assert display_name("C:\\Users\\a\\scan.png", "x") == "scan.png"
    assert display_name("a\x00b\n.png", "x") == "ab.png"
    assert display_name("", "fallback") == "fallback"
    assert len(display_name("n" * 500 + ".png", "x")) == 80


def test_upload_limits_and_reader_errors(images: dict[str, Path]) -> None:
    manager = JobManager(None, torch.device("cpu"), Limits(max_upload_bytes=1000))
    try:
        with pytest.raises(UploadTooLarge, match=r"limited to 0 MiB"):
            manager.add_upload(b"\0" * 1001, "infrared image big.png")
        with pytest.raises(UploadError, match=r"^visible image empty.png: the file is empty$"):
            manager.add_upload(b"", "visible image empty.png")
        # The reader's own words, with the server's temporary path replaced by the client's label.
        try:
            io.read_gray(images["broken"])
        except io.ImageReadError as exc:
            expected = str(exc).replace(str(images["broken"]), "infrared image broken.png")
        else:
            raise AssertionError("the truncated PNG was read")
        with pytest.raises(UploadError) as caught:
            manager.add_upload(images["broken"].read_bytes(), "infrared image broken.png", ".png")
        assert str(caught.value) == expected
        assert "ddfm-serve-" not in str(caught.value)
    finally:
        manager.close()


def test_uploads_get_the_readers_pixel_cap(images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI's cap (DDFM_FAST_MAX_PIXELS, checked from the header) applies to uploads as to files on disk.
    monkeypatch.setenv(io.MAX_PIXELS_ENV, str(128 * 96 - 1))
    try:
        io.read_gray(images["ir"])
    except io.ImageReadError as exc:
        expected = str(exc).replace(str(images["ir"]), "infrared image ir.png")
    else:
        raise AssertionError("the pixel cap did not apply")
    manager = JobManager(None, torch.device("cpu"))
    try:
        with pytest.raises(UploadError) as caught:
            manager.add_upload(images["ir"].read_bytes(), "infrared image ir.png", ".png")
        assert str(caught.value) == expected and "nothing was decoded" in expected
    finally:
        manager.close()


def test_nonfinite_result_is_an_error_with_the_samplers_words(images: dict[str, Path]) -> None:
    manager = JobManager(_NaNModel(), torch.device("cpu"), model_name="nan")
    try:
        ir = manager.add_upload(images["ir"].read_bytes(), "infrared image ir.png", ".png")
        vis = manager.add_upload(images["vis"].read_bytes(), "visible image vis.png", ".png")
        job = manager.submit(ir.token, vis.token, JobRequest(steps=3))
        snap = _wait_final(manager, job.id)
        assert snap["state"] == "error"
        assert snap["outputs"] == []
        with pytest.raises(NonFiniteError) as caught:  # what `ddfm-fast fuse` prints for the same failure
            api.fuse_prepared([job.pair], job.config, AccelConfig(), _NaNModel(), torch.device("cpu"))
        assert snap["error"] == str(caught.value)
    finally:
        manager.close()


def test_em_only_job_matches_the_library(images: dict[str, Path]) -> None:
    manager = JobManager(None, torch.device("cpu"))
    try:
        ir = manager.add_upload(images["ir"].read_bytes(), "infrared image ir.png", ".png")
        vis = manager.add_upload(images["vis"].read_bytes(), "visible image vis.png", ".png")
        with pytest.raises(RequestError, match="without a model"):
            manager.submit(ir.token, vis.token, JobRequest(prior="diffusion"))
        job = manager.submit(ir.token, vis.token, JobRequest(prior="none", steps=5))
        snap = _wait_final(manager, job.id)
        assert snap["state"] == "done", snap
        fused = np.asarray(Image.open(bytesio.BytesIO(manager.get(job.id).outputs["fused"])))
        want = api.fuse(images["ir"], images["vis"], config=SamplerConfig(prior="none", steps=5))
        assert np.array_equal(fused, want.fused)
    finally:
        manager.close()


def test_an_em_only_job_cancels_between_two_iterations(images: dict[str, Path], monkeypatch) -> None:
    """EM only has no UNet to gate, so the first EM iteration is held instead: the cancel must land at the next
    iteration's end, not when all of them have run."""
    import ddfm_fast.em_only as em_only

    entered, gate, real_step = threading.Event(), threading.Event(), em_only.em_step

    def held_step(*args, **kwargs):
        entered.set()
        gate.wait(60)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(em_only, "em_step", held_step)
    manager = JobManager(None, torch.device("cpu"))
    try:
        ir = manager.add_upload(images["ir"].read_bytes(), "infrared image ir.png", ".png")
        vis = manager.add_upload(images["vis"].read_bytes(), "visible image vis.png", ".png")
        job = manager.submit(ir.token, vis.token, JobRequest(prior="none", steps=50))
        assert entered.wait(30)
        manager.cancel(job.id)
        gate.set()
        snap = _wait_final(manager, job.id)
        assert snap["state"] == "cancelled" and snap["error"] == "cancelled after step 1 of 50", snap
        assert snap["outputs"] == [] and snap["step"] == 1
    finally:
        gate.set()
        manager.close()


class _GateModel(nn.Module):
    """A 'UNet' that holds its first call until the test opens the gate (zero epsilon after that)."""

    default_steps = 2

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.gate.wait(60)
        return torch.zeros_like(x)


def test_one_job_at_a_time_a_bounded_queue_and_cancel(images: dict[str, Path]) -> None:
    model = _GateModel()
    manager = JobManager(model, torch.device("cpu"), Limits(max_queue=1))
    try:
        ir = manager.add_upload(images["ir"].read_bytes(), "infrared image ir.png", ".png")
        vis = manager.add_upload(images["vis"].read_bytes(), "visible image vis.png", ".png")
        first = manager.submit(ir.token, vis.token, JobRequest())
        assert model.entered.wait(30)
        second = manager.submit(ir.token, vis.token, JobRequest())
        assert (first.state, second.state) == ("running", "queued")
        assert manager.queue_position(second) == 1  # the running job is ahead of it
        with pytest.raises(QueueFull, match="at most 1"):
            manager.submit(ir.token, vis.token, JobRequest())
        manager.cancel(second.id)
        assert second.state == "cancelled" and second.error == "cancelled before it started"
        manager.cancel(first.id)
        model.gate.set()
        snap = _wait_final(manager, first.id)
        assert snap["state"] == "cancelled" and snap["error"] == "cancelled after step 1 of 2", snap
        assert snap["outputs"] == []
    finally:
        model.gate.set()
        manager.close()


# --------------------------------------------------------------------------------------------------- the server


class Server:
    """The serve command (``python -m ddfm_fast.cli_serve --port 0``) in a subprocess; a thread drains its stderr.

    The command module is run on its own so these tests do not depend on every other command importing;
    :func:`test_serve_is_a_ddfm_fast_command` checks that ``ddfm-fast serve`` is this command.
    """

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "ddfm_fast.cli_serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._url = threading.Event()
        self.url = ""
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + SERVER_START_S
        while not self._url.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                time.sleep(0.2)  # let the drain thread take the last lines
                raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"ddfm-fast serve: (http://\S+/)", line)
            if m:
                self.url = m.group(1)
                self._url.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def get(self, path: str, host: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url.rstrip("/") + path, headers={"Host": host} if host else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, method="POST",
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server() -> Server:
    if not _have_web_extra():
        pytest.skip("the web extra is not installed (pip install -e '.[web]')")
    srv = Server("--max-upload-mb", "1")
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)


@needs_web
def test_startup_line_says_loopback(server: Server) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert any("loopback only" in line for line in server.lines)
    assert any("plan cpu: torch tail, fp32, eager" in line for line in server.lines)  # what the jobs run


@needs_web
def test_fast_serves_with_the_fast_plan_and_says_what_it_is() -> None:
    srv = Server("--fast")
    try:
        # On a CPU the fast plan is fp32 eager, and the line says why it picked nothing faster.
        plan_line = next(line for line in srv.lines if "plan cpu:" in line)
        assert "fp32" in plan_line and "not picked on a CPU" in plan_line, plan_line
    finally:
        assert srv.stop() == 0, "".join(srv.lines)


def test_a_fast_manager_hands_its_acceleration_to_every_diffusion_job(images: dict[str, Path], monkeypatch) -> None:
    from ddfm_fast.shrinkage import ShrinkagePrior

    seen = []
    real = api.fuse_prepared
    monkeypatch.setattr(api, "fuse_prepared", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    model = ShrinkagePrior()
    manager = JobManager(model, torch.device("cpu"), accel=AccelConfig.fast())
    try:
        ir = manager.add_upload(images["ir"].read_bytes(), "infrared image ir.png", ".png")
        vis = manager.add_upload(images["vis"].read_bytes(), "visible image vis.png", ".png")
        job = manager.submit(ir.token, vis.token, JobRequest(steps=3))
        assert _wait_final(manager, job.id)["state"] == "done"
        assert seen == [AccelConfig.fast()]
        fused = np.asarray(Image.open(bytesio.BytesIO(manager.get(job.id).outputs["fused"])))
        want = api.fuse(images["ir"], images["vis"], model=model, accel="fast", steps=3)
        assert np.array_equal(fused, want.fused)
    finally:
        manager.close()


@needs_web
def test_http_guards(server: Server, images: dict[str, Path]) -> None:
    # Another Host name (DNS rebinding) is refused while bound to loopback.
    assert server.get("/api/info", host="attacker.example")[0] == 400
    status, body = server.post("/api/uploads?slot=ir&mode=ivf&name=" + urllib.request.quote("../../x/ir.png"),
                               images["ir"].read_bytes())
    assert status == 200 and body["label"] == "infrared image ir.png", body  # the name is a label only
    assert not (Path.cwd() / "ir.png").exists()
    # Over the byte limit (1 MiB here): refused from the declared length, before any of the body is read.
    host, port = urllib.parse.urlsplit(server.url).hostname, urllib.parse.urlsplit(server.url).port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/api/uploads?slot=vis&mode=mif&name=big.png")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(1024 * 1024 + 1))
    conn.endheaders()
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and body["error"].startswith("MRI image big.png: the file is 1.0 MiB"), body
    status, body = server.post("/api/jobs", b'{"ir": "nope", "vis": "nope"}', "application/json")
    assert status == 400 and "missing or no longer kept" in body["error"], body


def test_serve_is_a_ddfm_fast_command() -> None:
    from ddfm_fast.cli import main
    from ddfm_fast.cli_serve import serve_command

    assert main.commands.get("serve") is serve_command


def test_serve_refuses_a_remote_host_and_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddfm_fast.cli_serve import is_loopback, serve_command

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    if _have_web_extra():
        r = CliRunner().invoke(serve_command, ["--host", "0.0.0.0"])
        assert r.exit_code == 2 and "not a loopback address" in r.output and "--allow-remote" in r.output
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    r = CliRunner().invoke(serve_command, [])
    assert r.exit_code == 1
    assert "pip install 'ddfm-fast[web]'" in r.output and len(r.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(server: Server):
    with chromium() as b:
        yield b


def _open(browser, server: Server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return page


def _choose(page, images: dict[str, Path], ir: str = "ir", vis: str = "vis") -> None:
    page.set_input_files("#file-ir", str(images[ir]))
    page.set_input_files("#file-vis", str(images[vis]))
    page.wait_for_function("window.ddfm.uploads.ir && window.ddfm.uploads.vis", timeout=30_000)


def _job_id(page) -> str:
    return page.evaluate("window.ddfm.job.id")


def test_page_fuses_a_pair_and_shows_image_metrics_downloads(browser, server: Server, images: dict[str, Path],
                                                             tmp_path: Path) -> None:
    page = _open(browser, server)
    assert page.inner_text("#role-ir") == "Infrared image" and page.inner_text("#role-vis") == "Visible image"
    _choose(page, images)
    page.fill("#steps", "4")
    page.click("#fuse")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.get_attribute("#status", "data-state") == "done"
    # The fused image is shown at its size, and the live x0 estimate of the last step.
    page.wait_for_function("document.getElementById('fused-img').naturalWidth > 0", timeout=10_000)
    assert page.evaluate("[document.getElementById('fused-img').naturalWidth, "
                         "document.getElementById('fused-img').naturalHeight]") == [128, 96]
    assert page.is_visible("#live") and page.inner_text("#live-caption") == "x0 estimate after step 4 of 4"
    # The metrics table: the 12 names, and the values of the served image scored as `ddfm-fast eval` scores it.
    assert page.eval_on_selector_all("#metrics th", "els => els.map(e => e.textContent)") == list(METRIC_NAMES)
    shown = page.eval_on_selector_all("#metrics td", "els => els.map(e => e.textContent)")
    job = _job_id(page)
    status, png = server.get(f"/api/jobs/{job}/fused.png")
    assert status == 200
    fused = np.asarray(Image.open(bytesio.BytesIO(png)))
    want = evaluate(fused.astype(np.float32), read_gray_eval(images["ir"]), read_gray_eval(images["vis"]))
    assert shown == [f"{want[k]:.4f}" for k in METRIC_NAMES]
    # The same pixels as the library gives for the same pair and settings (one thread, as the server runs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", api.DefaultPriorNotice)
            res = api.fuse(images["ir"], images["vis"], config=SamplerConfig(steps=4))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(fused, res.fused)
    status, png16 = server.get(f"/api/jobs/{job}/fused16.png")
    img16 = Image.open(bytesio.BytesIO(png16))
    assert img16.mode.startswith("I;16") and np.array_equal(np.asarray(img16), io.luma_to_uint16(res.luma))
    assert page.is_visible("#download-png") and page.is_visible("#download-png16")
    assert not page.is_visible("#download-color")  # no colour output was asked for
    assert page.get_attribute("#download-png", "href") == f"/api/jobs/{job}/fused.png"
    assert page.get_attribute("#download-png16", "href") == f"/api/jobs/{job}/fused16.png"
    with page.expect_download() as dl:
        page.click("#download-png")
    assert dl.value.suggested_filename == f"ddfm_{job}_fused.png"
    # The before/after slider moves the boundary between source and fusion.
    page.fill("#slider", "30")
    assert page.evaluate("document.getElementById('compare-top').style.clipPath") == "inset(0px 0px 0px 30%)"
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    if os.environ.get("DDFM_SERVE_SCREENSHOT"):
        page.screenshot(path=os.environ["DDFM_SERVE_SCREENSHOT"], full_page=True)
    page.close()


def test_cancel_stops_a_long_run_promptly_and_the_queue_is_visible(browser, server: Server,
                                                                     images: dict[str, Path]) -> None:
    first = _open(browser, server)
    _choose(first, images)
    first.fill("#steps", "1000")  # about 80 s at this size on one thread: far longer than the bound below
    first.click("#fuse")
    first.wait_for_function("/^step ([3-9]|\\d\\d+) of 1000$/.test(document.getElementById('status').textContent)",
                            timeout=120_000)
    second = _open(browser, server)
    _choose(second, images)
    second.fill("#steps", "2")
    second.click("#fuse")
    second.wait_for_function("document.getElementById('status').textContent === 'queued: 1 job ahead'",
                             timeout=30_000)
    # The status comes from the submit's reply; the queue list from the job's event stream, a moment later.
    second.wait_for_function("document.querySelectorAll('#queue li[data-state]').length === 2", timeout=30_000)
    assert "running, step" in second.inner_text("#queue li[data-state=running]")
    long_job = _job_id(first)
    t0 = time.monotonic()
    first.click("#cancel")
    first.wait_for_selector("#status[data-state=cancelled]", timeout=30_000)
    elapsed = time.monotonic() - t0
    # One step at 128x96 takes ~0.1 s here; 10 s leaves room for a loaded machine, far below the ~80 s run.
    assert elapsed < 10, f"cancel took {elapsed:.1f} s"
    assert re.fullmatch(r"cancelled after step \d+ of 1000", first.inner_text("#status"))
    snap = json.loads(server.get(f"/api/jobs/{long_job}")[1])
    time.sleep(1.0)
    again = json.loads(server.get(f"/api/jobs/{long_job}")[1])
    assert snap["state"] == again["state"] == "cancelled" and again["step"] == snap["step"] < 1000
    assert again["outputs"] == []
    # The queued job runs next.
    second.wait_for_selector("#result:not([hidden])", timeout=120_000)
    first.close()
    second.close()


def test_corrupt_upload_shows_the_readers_error_on_the_page(browser, server: Server,
                                                           images: dict[str, Path]) -> None:
    page = _open(browser, server)
    page.set_input_files("#file-ir", str(images["broken"]))
    page.wait_for_function("document.getElementById('err-ir').textContent !== ''", timeout=30_000)
    try:
        io.read_gray(images["broken"])
    except io.ImageReadError as exc:  # what `ddfm-fast fuse` prints, naming the file by its path
        expected = str(exc).replace(str(images["broken"]), "infrared image broken.png")
    assert page.inner_text("#err-ir") == expected
    page.set_input_files("#file-vis", str(images["vis"]))
    page.wait_for_function("window.ddfm.uploads.vis", timeout=30_000)
    assert page.is_disabled("#fuse")
    page.close()


def test_size_mismatch_shows_the_librarys_error_on_the_page(browser, server: Server,
                                                            images: dict[str, Path]) -> None:
    page = _open(browser, server)
    _choose(page, images, vis="vis_small")
    page.click("#fuse")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    with pytest.raises(ValueError) as caught:
        api.prepare_arrays(io.read_gray(images["ir"]), io.read_gray(images["vis_small"]), "pad",
                           ir_name="infrared image ir.png", vis_name="visible image vis_small.png")
    assert page.inner_text("#error") == str(caught.value)
    page.close()


def test_medical_mode_labels_the_roles_and_keeps_the_pet_colours(browser, server: Server,
                                                                  tmp_path: Path) -> None:
    from ddfm_fast.samples import example_pair

    pet, mri = (tmp_path / "pet.png", tmp_path / "mri.png")
    for src, dest in zip(example_pair("mif"), (pet, mri)):
        Image.open(src).crop((80, 80, 176, 176)).save(dest)  # 96x96 from the middle of the 256x256 slice
    page = _open(browser, server)
    page.check("#mode-mif")
    assert page.inner_text("#role-ir") == "Functional image (CT / PET / SPECT)"
    assert page.inner_text("#role-vis") == "MRI image"
    _choose(page, {"ir": pet, "vis": mri})
    page.fill("#steps", "2")
    page.check("#color")
    page.click("#fuse")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.is_visible("#download-color")
    job = _job_id(page)
    fused = np.asarray(Image.open(bytesio.BytesIO(server.get(f"/api/jobs/{job}/fused.png")[1])))
    colour = np.asarray(Image.open(bytesio.BytesIO(server.get(f"/api/jobs/{job}/color.png")[1])))
    # The PET image gives the chroma in medical fusion, as `ddfm-fast fuse --color` does.
    assert np.array_equal(colour, io.colorize(fused, io.read_rgb8(pet)))
    assert page.get_attribute("#fused-img", "src") == f"/api/jobs/{job}/color.png?inline=1"
    assert page.inner_text("#metrics-caption") == (
        "The 8-bit gray fusion scored as ddfm-fast eval scores files: "
        "A = functional image (CT / PET / SPECT) pet.png, B = MRI image mri.png.")
    page.close()


def test_ctrl_c_with_a_page_following_a_job_stops_at_once() -> None:
    """A page that follows a queued job keeps an event stream open; Ctrl-C cancels the jobs first, so the stream
    gets the job's final state and ends, and the server stops promptly with no traceback."""
    from ddfm_fast.samples import example_pair

    srv = Server()
    try:
        tokens = []
        for slot, path in zip(("ir", "vis"), example_pair("ivf")):  # 640x480: a 1000-step job takes seconds
            status, body = srv.post(f"/api/uploads?slot={slot}&mode=ivf&name={slot}.png", path.read_bytes())
            assert status == 200, body
            tokens.append(body["token"])
        jobs = []
        for _ in range(3):
            status, body = srv.post("/api/jobs", json.dumps({"ir": tokens[0], "vis": tokens[1], "steps": 1000}).encode(),
                                    "application/json")
            assert status == 201, body
            jobs.append(body["id"])
        events: list[dict] = []

        def follow() -> None:
            with urllib.request.urlopen(srv.url.rstrip("/") + f"/api/jobs/{jobs[-1]}/events", timeout=60) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while json.loads(srv.get(f"/api/jobs/{jobs[0]}")[1])["state"] != "running":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.05)
        t0 = time.monotonic()
        code = srv.stop()
        took = time.monotonic() - t0
        reader.join(10)
    finally:
        srv.stop()
    log = "".join(srv.lines)
    assert code == 0 and took < 4.0, (code, took, log)
    assert "Traceback" not in log and "ERROR" not in log, log
    assert events and events[-1]["state"] == "cancelled", events[-1:] or "no event"


def test_a_job_says_when_it_fused_an_image_with_itself_or_flat_inputs(images: dict[str, Path]) -> None:
    manager = JobManager(None, torch.device("cpu"))
    try:
        ir = manager.add_upload(images["ir"].read_bytes(), "infrared image ir.png", ".png")
        flat = bytesio.BytesIO()
        Image.fromarray(np.full((96, 128), 7, np.uint8)).save(flat, format="PNG")
        flat_up = manager.add_upload(flat.getvalue(), "infrared image flat.png", ".png")
        snap = _wait_final(manager, manager.submit(ir.token, ir.token, JobRequest(prior="none", steps=2)).id)
        assert snap["state"] == "done" and any("fused with itself" in n for n in snap["notes"]), snap
        snap = _wait_final(manager, manager.submit(flat_up.token, flat_up.token,
                                                   JobRequest(prior="none", steps=2)).id)
        assert any("are the inputs flat?" in n for n in snap["notes"]), snap
    finally:
        manager.close()


def test_job_requests_take_only_what_the_page_offers() -> None:
    from ddfm_fast.web.app import parse_request

    ir, vis, req = parse_request({"ir": "a", "vis": "b", "steps": "12", "seed": 5})
    assert (ir, vis, req.steps, req.seed) == ("a", "b", 12, 5)
    with pytest.raises(RequestError, match="unknown field.*'lamb'"):
        parse_request({"ir": "a", "vis": "b", "lamb": 100})
    with pytest.raises(RequestError, match="steps must be a whole number"):
        parse_request({"ir": "a", "vis": "b", "steps": "\u0663"})  # an Arabic-Indic three


def test_deeply_nested_json_is_a_bad_request(server: Server) -> None:
    status, body = server.post("/api/jobs", b"[" * 100000, "application/json")
    assert status == 400 and body["error"] == "the request must be a JSON object", body
    assert not any("Traceback" in line for line in server.lines)
