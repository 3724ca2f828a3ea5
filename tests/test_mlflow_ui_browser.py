"""End to end in a real browser: what a user sees in ``e2kd ui`` after a sweep.

Runs a real, tiny quickstart-like sweep (Ray Tune + Train, 2 trials: the KD baseline and one
e²KD trial, 2 epochs, a grid each epoch) and ``e2kd report --register``, serves the store with
``e2kd ui`` (``python -m mlflow ui`` on 127.0.0.1), then drives headless Debian Chromium with
Playwright, each page in a fresh browser profile; what MLflow holds (read with MlflowClient) is the
oracle:

- the link the sweep and the report print (``…/#/experiments/<id>/runs?workflowType=machine_learning``)
  opens the runs table in model-training mode: the parent ``sweep-quickstart`` expands to its two
  children, with their dataset and logged student (docs/mlflow-runs.png);
- the run comparison (``#/compare-runs?runs=[...]&experiments=[...]``) lists the trials with their
  params in the right columns (docs/mlflow-compare.png);
- a trial's artifacts tab renders ``explanations.png`` at its own size, and the UI's artifact
  endpoint serves the logged bytes;
- the chart view's ``explanations`` image card has a slider over the epochs the grids were logged
  at, and shows the last epoch's grid (docs/mlflow-images.png);
- the registered model's version page shows its teacher, λ, τ and metrics tags.

Needs /usr/bin/chromium (installed with apt-get when missing and running as root; never
``playwright install``) and playwright (the ``dev`` extra). Screenshots are also kept in each
test's tmp_path; ``pytest --basetemp DIR`` to find them.
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
DOCS = os.path.join(ROOT, "docs")  # the README's screenshots: mlflow-runs.png, mlflow-compare.png, mlflow-images.png
EXPERIMENT = "e2kd-quickstart"
MODEL = "e2kd-quickstart-student"
HEALTH_TIMEOUT_S = 150
PNG = "explanations.png"  # tracking.PNG_NAME
IMAGE_KEY = "explanations"  # tracking.IMAGE_KEY


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


def quickstart_like_spec(tmp, teacher_dir: str) -> dict:
    """The quickstart at toy size: 2 trials (the KD baseline and one e²KD trial), 2 epochs, a grid
    at every epoch, in an experiment named like the quickstart's (the README's screenshots)."""
    import yaml

    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(storage=str(tmp / "runs"), epochs=2, explain_every=1)
    d["data"].update(shots=3)
    d["eval"].update(val_every=1)
    d["teacher"].update(path=teacher_dir)
    d["search"].update(num_trials=2, n_startup_trials=1)
    d["search"]["space"]["loss.temperature"] = {"type": "choice", "values": [1.0]}  # no matched-KD phase
    d["resources"].update(num_cpus=2)
    d["mlflow"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": EXPERIMENT}
    return d


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, teacher_dir) -> dict:
    """A real sweep (Ray Tune + Train, the product's MLflow logging), then `e2kd report --register`;
    returns what MLflow holds (read with MlflowClient: the oracle for the pages) and what was printed."""
    import contextlib
    import io

    import ray
    import yaml
    from mlflow import MlflowClient

    from orchestrator import cli, tracking
    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("ui-sweep")
    d = quickstart_like_spec(tmp, teacher_dir)
    spec_path = tmp / "quickstart.yaml"
    spec_path.write_text(yaml.safe_dump(d))
    spec = spec_from_dict(d, source=str(spec_path))
    uri = d["mlflow"]["tracking_uri"]
    printed: list[str] = []
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid = run_sweep(spec, log=printed.append)
    finally:
        ray.shutdown()
    assert len(grid) == 2 and not grid.errors
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["report", EXPERIMENT, "--tracking-uri", uri, "--out", str(tmp / "report"),
                         "--register", MODEL]) == 0
    printed += out.getvalue().splitlines()
    sweep_s = time.monotonic() - t0

    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = tracking.find_parent(client, exp_id, spec.name)
    children = []
    for run in client.search_runs([exp_id], tracking.tag_equals(tracking.TAG_PARENT, parent)):
        png = client.download_artifacts(run.info.run_id, PNG, str(tmp / run.info.run_id))
        steps = sorted({int(a.path.split("+step+")[1].split("+")[0]) for a in client.list_artifacts(run.info.run_id, "images")})
        children.append({"run_id": run.info.run_id, "name": run.info.run_name, "params": run.data.params,
                         "png": open(png, "rb").read(), "image_steps": steps,
                         "dataset": run.inputs.dataset_inputs[0].dataset.name})
    assert len(children) == 2
    return {"uri": uri, "exp_id": exp_id, "parent": parent, "parent_name": f"sweep-{spec.name}",
            "children": children, "printed": printed, "sweep_s": sweep_s}


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


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def ui(sweep, chromium, tmp_path_factory):
    """``e2kd ui`` on the sweep's store and a headless Chromium; each test opens its own fresh
    browser context (a new profile: no remembered GenAI/ML switch, no local storage)."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is in the dev extra: pip install -e '.[dev]'")
    log = tmp_path_factory.mktemp("ui-log") / "mlflow-ui.log"
    server = UiServer(sweep["uri"], free_port(), str(log))
    try:
        health_s = server.wait_healthy(HEALTH_TIMEOUT_S)
        print(f"[ui-test] sweep + report {sweep['sweep_s']:.0f} s; /health {health_s:.0f} s after start")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                yield {"server": server, "browser": browser}
            finally:
                browser.close()
    finally:
        server.stop()


def fresh_page(ui, height: int = 1000):
    page = ui["browser"].new_context(viewport={"width": 1400, "height": height}).new_page()
    page.set_default_timeout(90_000)
    return page


def close_assistant(page) -> None:
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()


def save_screenshot(page, tmp_path, name: str) -> None:
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / name))
    assert png_size((tmp_path / name).read_bytes()) == tuple(page.viewport_size.values())
    os.makedirs(DOCS, exist_ok=True)
    shutil.copyfile(tmp_path / name, os.path.join(DOCS, name))


def local_link(sweep, ui) -> str:
    """The link the sweep and the report printed, checked, then opened on this test's port."""
    want = f"http://127.0.0.1:5000/#/experiments/{sweep['exp_id']}/runs?workflowType=machine_learning"
    lines = [line for line in sweep["printed"] if "MLflow runs: " in line]
    assert len(lines) == 2, sweep["printed"]  # the sweep's start and the report
    assert all(line.split("MLflow runs: ")[1].split(" ")[0] == want for line in lines), lines
    return want.replace("http://127.0.0.1:5000", ui["server"].url)


def expand_parent(page, sweep) -> None:
    page.get_by_text(sweep["parent_name"], exact=True).first.wait_for()
    page.locator('[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()  # the row's expander
    for c in sweep["children"]:
        page.get_by_text(c["name"], exact=True).first.wait_for()


def test_printed_link_opens_the_sweep_with_its_children(sweep, ui, tmp_path):
    link = local_link(sweep, ui)
    ui["server"].log.flush()
    with open(ui["server"].log.name) as f:  # `e2kd ui` prints it, on its own port
        assert f"[e2kd] {EXPERIMENT}: {link}" in f.read()
    page = fresh_page(ui, height=560)
    page.goto(link, wait_until="domcontentloaded")
    expand_parent(page, sweep)
    close_assistant(page)
    # Model-training mode (not the GenAI default), the runs table with its Dataset and Source columns.
    page.get_by_role("heading", name="Runs").first.wait_for()
    assert page.get_by_text("Evaluation runs", exact=True).count() == 0  # a GenAI-mode menu entry
    body = page.inner_text("body")
    for c in sweep["children"]:
        assert c["name"] in body and c["dataset"] in body, body[:3000]
    assert "student" in body  # the Models column: each child's logged student
    save_screenshot(page, tmp_path, "mlflow-runs.png")


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


def test_compare_page_and_explanation_png_in_chromium(sweep, ui, tmp_path):
    children = sweep["children"]
    run_ids = [c["run_id"] for c in children]
    page = fresh_page(ui)
    # ---- the run comparison, at the route MLflow's Compare button builds (getCompareRunPageRoute)
    q = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([sweep["exp_id"]]),
                                "workflowType": "machine_learning"}, quote_via=urllib.parse.quote)
    page.goto(f"{ui['server'].url}/#/compare-runs?{q}", wait_until="domcontentloaded")
    page.get_by_role("heading", name=f"Comparing {len(children)} Runs from 1 Experiment").wait_for()
    page.locator("table.mlflow-compare-table th", has_text="loss.temperature").first.wait_for()
    table = compare_tables(page)
    ids, names = table["Run ID:"], table["Run Name:"]
    # One column per trial; every cell of a column belongs to that column's run (MLflow's own record).
    assert sorted(ids) == sorted(run_ids), table
    col = {run_id: i for i, run_id in enumerate(ids)}
    for c in children:
        i = col[c["run_id"]]
        assert names[i] == c["name"], names
        for key in ("loss.lam", "loss.temperature", "student", "loss.explainer"):
            assert table[key][i] == c["params"][key], (key, table[key])
    assert sorted(table["loss.lam"])[0] == "0.0"  # the KD baseline is one of them
    metrics_text = page.locator(".ReactVirtualized__Grid").first.inner_text()
    for key in ("epoch", "test_acc", "test_exp_sim"):  # the grid is virtualised: the first rows in name order
        assert key in metrics_text, metrics_text

    # Screenshot: assistant panel closed, plots folded, only the params that differ.
    close_assistant(page)
    page.get_by_text("Visualizations", exact=True).first.click()
    diff = page.get_by_role("switch", name="Parameters - Show diff only")
    diff.click()
    page.wait_for_function("() => !Array.from(document.querySelectorAll('table.mlflow-compare-table "
                           ".head-value')).some(th => th.innerText.trim() === 'optim.lr')")
    assert diff.get_attribute("aria-checked") == "true"
    shown = compare_tables(page)
    assert "loss.lam" in shown and "optim.lr" not in shown
    save_screenshot(page, tmp_path, "mlflow-compare.png")

    # ---- a trial's artifacts tab renders explanations.png at the PNG's own size
    c = children[-1]
    page.goto(f"{ui['server'].url}/#/experiments/{sweep['exp_id']}/runs/{c['run_id']}/artifacts/{PNG}",
              wait_until="domcontentloaded")
    img = page.locator(f"img[alt='{PNG}']").first
    img.wait_for()
    page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    assert tuple(img.evaluate("el => [el.naturalWidth, el.naturalHeight]")) == png_size(c["png"])

    # ---- and the UI's artifact endpoint, fetched from the page, serves the logged bytes
    for c in children:
        body = page.evaluate("""async (src) => {
            const r = await fetch(src);
            return {status: r.status, bytes: Array.from(new Uint8Array(await r.arrayBuffer()))};
        }""", f"get-artifact?path={PNG}&run_uuid={c['run_id']}")
        assert body["status"] == 200, body["status"]
        assert bytes(body["bytes"]) == c["png"]


def test_explanation_grids_have_an_epoch_slider(sweep, ui, tmp_path):
    steps = sweep["children"][0]["image_steps"]
    assert steps == [1, 2]  # MLflow holds one grid per epoch (explain_every 1, 2 epochs)
    page = fresh_page(ui, height=1300)  # the grid is tall: 8 samples × (image | teacher | student)
    page.goto(local_link(sweep, ui) + "&compareRunsMode=CHART", wait_until="domcontentloaded")
    expand_parent(page, sweep)
    close_assistant(page)
    page.get_by_placeholder("Search metric charts").fill(IMAGE_KEY)
    slider = page.locator("[role=slider]").first
    slider.wait_for()
    # The slider runs over the epochs the grids were logged at.
    assert (slider.get_attribute("aria-valuemin"), slider.get_attribute("aria-valuemax")) == (str(steps[0]), str(steps[-1]))
    # The card's full-screen view; a click at the end of the slider's track moves it to the last epoch.
    page.locator('[data-component-id$="fullscreen_button_chartcard"]').first.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    track = dialog.locator("[role=slider]").first.locator("xpath=../..").bounding_box()
    page.mouse.click(track["x"] + track["width"] - 2, track["y"] + track["height"] / 2)
    page.wait_for_function("(v) => Array.from(document.querySelectorAll('[role=dialog] [role=slider]'))"
                           ".some(s => s.getAttribute('aria-valuenow') === v)", arg=str(steps[-1]))
    # The shown grid has loaded, and it is the last epoch's image (its artifact name holds the step).
    srcs = page.wait_for_function("""() => {
        const imgs = Array.from(document.querySelectorAll('[role=dialog] img')).filter(
            i => i.src.includes('explanations') && i.complete && i.naturalWidth > 0);
        return imgs.length ? imgs.map(i => i.getAttribute('src')) : null;
    }""").json_value()
    assert all(f"+step+{steps[-1]}+" in urllib.parse.unquote(src) for src in srcs), srcs
    save_screenshot(page, tmp_path, "mlflow-images.png")


def test_registered_model_page_shows_the_version_and_its_tags(sweep, ui):
    from mlflow import MlflowClient

    version = MlflowClient(sweep["uri"]).get_model_version(MODEL, "1")
    assert version.run_id in [c["run_id"] for c in sweep["children"]]
    assert any(f"registered {MODEL} version 1" in line for line in sweep["printed"])
    page = fresh_page(ui)
    page.goto(f"{ui['server'].url}/#/models/{MODEL}/versions/1", wait_until="domcontentloaded")
    page.get_by_text("Version 1", exact=False).first.wait_for()
    close_assistant(page)
    body = page.inner_text("body")
    for key in ("teacher", "loss.lam", "loss.temperature", "val_agreement"):
        assert key in body and version.tags[key] in body, (key, body[:3000])
