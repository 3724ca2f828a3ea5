"""End to end in a real browser: what a user sees in ``e2kd ui`` after a sweep.

Builds an MLflow SQLite store shaped like a sweep's with the product's own tracking functions
(one parent, three trial children with their dotted params, per-epoch metrics at steps 1..3 and a
real ``explanations.png``), serves it with ``e2kd ui`` (``python -m mlflow ui`` on 127.0.0.1),
then drives headless Debian Chromium with Playwright:

- the experiment's run comparison (``#/compare-runs?runs=[...]&experiments=[...]``) lists the three
  trials with their ``loss.lam``, ``loss.temperature`` and ``student`` values in the right columns;
- a trial's artifacts tab renders ``explanations.png`` (an <img> whose natural size is the PNG's),
  and the UI's artifact endpoint, fetched from inside the page, returns the same PNG bytes;
- a screenshot of the comparison is written to docs/mlflow-compare.png.

Needs /usr/bin/chromium (installed with apt-get when missing and running as root; never
``playwright install``) and playwright (the ``dev`` extra). The server's log and both screenshots
(compare.png, artifact.png) stay in the test's tmp_path; ``pytest --basetemp DIR`` to find them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.path.join(ROOT, "docs", "mlflow-compare.png")
EXPERIMENT = "e2kd-ui-browser"
# (trial id, loss.lam, loss.temperature, student): the KD baseline and two e²KD trials.
TRIALS = [("a0001", 0.0, 1.0, "tiny_cnn"), ("a0002", 0.37, 5.0, "tiny_cnn"), ("a0003", 2.9, 5.0, "small_cnn")]
HEALTH_TIMEOUT_S = 150
PNG = "explanations.png"  # tracking.PNG_NAME, checked in build_store


# ------------------------------------------------------------------ prerequisites


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing (root only)."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip(f"{CHROMIUM} is not installed and this process cannot apt-get install it (not root "
                        "or no apt-get): `apt-get install -y chromium` to run this test")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "chromium"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:  # stale package lists: update once, then retry
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not os.path.exists(CHROMIUM):
            pytest.skip(f"apt-get install chromium failed (no package mirror reachable?): {r.stderr[-500:]}")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------ the store


def build_store(tmp_path, uri: str) -> dict:
    """A sweep-shaped store made by the product's tracking functions (no Ray, no training)."""
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from orchestrator import tracking
    from orchestrator.spec import load_spec
    from trainables.config import flatten, with_overrides
    from trainables.models import build_model
    from trainables.train_loop import explanation_grid

    assert tracking.PNG_NAME == PNG
    spec = load_spec(os.path.join(ROOT, "sweeps", "quickstart.yaml"))
    client = MlflowClient(uri)
    exp_id = tracking.ensure_experiment(client, EXPERIMENT, tracking.default_artifact_location(uri))
    parent = tracking.create_parent(client, exp_id, spec.name, spec.source, tracking.trial_params(spec.params()),
                                    tags={"e2kd.metric": spec.search.metric, "e2kd.mode": spec.search.mode})

    torch.manual_seed(0)
    teacher = build_model("small_cnn", 10).eval()
    images = torch.rand(2, 3, 32, 32)
    children = []
    for trial_id, lam, temp, student_arch in TRIALS:
        cfg = with_overrides(spec.train, {"loss.lam": lam, "loss.temperature": temp, "student": student_arch})
        run_id = tracking.get_or_create_child(
            uri, exp_id, parent, spec.name, trial_id, params=tracking.trial_params(flatten(cfg)),
            tags={"student": cfg.student, "explainer": cfg.loss.explainer, "teacher": cfg.teacher.arch,
                  "method": "kd" if lam == 0 else "e2kd", "seed": str(cfg.seed)})
        for epoch in (1, 2, 3):  # what MlflowEpochCallback logs after each report
            now = int(time.time() * 1000)
            metrics = {"epoch": epoch, "train_loss": 2.0 / epoch, "val_agreement": 0.5 + 0.1 * epoch + lam / 100,
                       "train_time_s": 0.4}
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        png = tmp_path / f"png-{trial_id}" / tracking.PNG_NAME
        png.parent.mkdir()
        explanation_grid(build_model(student_arch, 10), teacher, images, cfg, str(png))
        client.log_artifact(run_id, str(png))
        client.set_terminated(run_id, status="FINISHED")
        children.append({"run_id": run_id, "trial_id": trial_id, "lam": lam, "temp": temp, "student": student_arch,
                         "png": png.read_bytes()})
    client.set_terminated(parent, status="FINISHED")

    # The store is what a sweep leaves: one parent, three children with the dotted params.
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 3
    for c in children:
        run = client.get_run(c["run_id"])
        assert run.data.params["loss.lam"] == str(c["lam"])
        assert [m.step for m in client.get_metric_history(c["run_id"], "val_agreement")] == [1, 2, 3]
        assert tracking.PNG_NAME in [a.path for a in client.list_artifacts(c["run_id"])]
    return {"uri": uri, "exp_id": exp_id, "parent": parent, "children": children}


# ------------------------------------------------------------------ the server


class UiServer:
    """``e2kd ui`` in its own process group (it spawns ``mlflow ui``, which spawns uvicorn)."""

    def __init__(self, uri: str, port: int, log_path: str):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        # One uvicorn worker and no GenAI job runner (huey consumers): the test machine is small, and
        # neither changes the pages under test.
        env = {**os.environ, "MLFLOW_WORKERS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # Exactly what a user runs: `e2kd ui --tracking-uri ... --port P` (host defaults to 127.0.0.1).
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--tracking-uri", uri,
                                      "--port", str(port)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"e2kd ui exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"MLflow UI not healthy after {timeout_s} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: e2kd ui forwards it to mlflow, mlflow to uvicorn
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of this process group is left
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=15)
        self.log.close()


# ------------------------------------------------------------------ the test


def compare_tables(page) -> dict[str, list[str]]:
    """Run details and Parameters tables as {row header: [cell text per run column]}; the Run ID
    row holds the run ids from the cells' links."""
    return page.evaluate("""() => {
        const out = {};
        for (const tr of document.querySelectorAll('table.mlflow-compare-table tr')) {
            const th = tr.querySelector('.head-value');
            if (!th) continue;
            out[th.innerText.trim()] = Array.from(tr.querySelectorAll('.data-value')).map(
                c => c.querySelector('a[href*="/runs/"]')
                     ? c.querySelector('a[href*="/runs/"]').getAttribute('href').split('/runs/')[1]
                     : c.innerText.trim());
        }
        return out;
    }""")


def test_compare_page_and_explanation_png_in_chromium(tmp_path, chromium):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is in the dev extra: pip install -e '.[dev]'")
    from mlflow import MlflowClient

    t_start = time.monotonic()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments(max_results=1)  # creates the schema before the server opens it
    server = UiServer(uri, free_port(), str(tmp_path / "mlflow-ui.log"))
    try:
        store = build_store(tmp_path, uri)  # while the server starts (it takes a minute or more here)
        children = store["children"]
        run_ids = [c["run_id"] for c in children]
        health_s = server.wait_healthy(HEALTH_TIMEOUT_S)
        t_healthy = time.monotonic() - t_start
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(90_000)

                # ---- the run comparison, at the route MLflow's Compare button builds (getCompareRunPageRoute)
                q = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([store["exp_id"]])},
                                           quote_via=urllib.parse.quote)
                page.goto(f"{server.url}/#/compare-runs?{q}", wait_until="domcontentloaded")
                page.get_by_role("heading", name="Comparing 3 Runs from 1 Experiment").wait_for()
                page.locator("table.mlflow-compare-table th", has_text="loss.temperature").first.wait_for()
                table = compare_tables(page)
                ids, names = table["Run ID:"], table["Run Name:"]
                # One column per trial; every cell of a column belongs to that column's run.
                assert sorted(ids) == sorted(run_ids), table
                col = {run_id: i for i, run_id in enumerate(ids)}
                for c in children:
                    i = col[c["run_id"]]
                    assert names[i] == f"trial-{c['trial_id']}", names
                    assert table["loss.lam"][i] == str(c["lam"]), table["loss.lam"]
                    assert table["loss.temperature"][i] == str(c["temp"]), table["loss.temperature"]
                    assert table["student"][i] == c["student"], table["student"]
                    assert table["explainer"][i] == "gradcam", table["explainer"]
                metrics_text = page.locator(".ReactVirtualized__Grid").first.inner_text()
                for key in ("epoch", "train_loss", "val_agreement"):
                    assert key in metrics_text, metrics_text

                # Screenshot: assistant panel closed, plots folded, only the params that differ.
                close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
                if close.count():
                    close.first.click()
                page.get_by_text("Visualizations", exact=True).first.click()
                diff = page.get_by_role("switch", name="Parameters - Show diff only")
                diff.click()
                page.wait_for_function("() => !Array.from(document.querySelectorAll('table.mlflow-compare-table "
                                       ".head-value')).some(th => th.innerText.trim() === 'optim.lr')")
                assert diff.get_attribute("aria-checked") == "true"
                shown = compare_tables(page)
                assert {"loss.lam", "loss.temperature", "student"} <= set(shown) and "optim.lr" not in shown
                page.wait_for_timeout(500)
                os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
                page.screenshot(path=str(tmp_path / "compare.png"))
                shutil.copyfile(tmp_path / "compare.png", SCREENSHOT)
                assert png_size((tmp_path / "compare.png").read_bytes()) == (1400, 1000)

                # ---- a trial's artifacts tab renders explanations.png at the PNG's own size
                c = children[-1]
                page.goto(f"{server.url}/#/experiments/{store['exp_id']}/runs/{c['run_id']}/artifacts/"
                          f"{PNG}", wait_until="domcontentloaded")
                img = page.locator(f"img[alt='{PNG}']").first
                img.wait_for()
                page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle())
                natural = tuple(img.evaluate("el => [el.naturalWidth, el.naturalHeight]"))
                assert natural == png_size(c["png"]), natural
                page.screenshot(path=str(tmp_path / "artifact.png"))

                # ---- and the UI's artifact endpoint, fetched from the page, serves the logged bytes
                for c in children:
                    body = page.evaluate("""async (src) => {
                        const r = await fetch(src);
                        return {status: r.status, bytes: Array.from(new Uint8Array(await r.arrayBuffer()))};
                    }""", f"get-artifact?path={PNG}&run_uuid={c['run_id']}")
                    assert body["status"] == 200, body["status"]
                    data = bytes(body["bytes"])
                    assert png_size(data) == png_size(c["png"]) and data == c["png"]
            finally:
                browser.close()
    finally:
        server.stop()
    print(f"[ui-test] /health {health_s:.0f} s after start; healthy at {t_healthy:.0f} s; "
          f"whole test {time.monotonic() - t_start:.0f} s")

