"""The dashboard: its read-only APIs (inbox, quarantine, loss charts), the page shell, and the page itself in headless
Chromium against the real daemon (skipped where Chromium, chromedriver or selenium are missing).

The daemon runs with an API key and a state directory seeded with an adapter (two versions, an eval report), a
finished run with its loss chart, inbox files and quarantined files. Some seeded texts are HTML: the page must
show them as text. The browser test leaves a screenshot in ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from solverx.adapters.registry import Registry
from solverx.adapters.validate import base_linear_shapes
from solverx.trainer.run import _save_loss_chart
from solverx.trainer.runlog import RunLog
from solverx.trainer.train import StageResult

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO_ROOT / "test-artifacts" / "dashboard.png"
MODEL = "solverx-tiny"
ADAPTER = "solverx"
KEY = "dash-key-7"
AUTH = {"Authorization": f"Bearer {KEY}"}
RUN_ID = "20250103T000000000000Z-solverx"
EVIL = '<img src=x onerror="window.__xss=1">'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_adapter(path: Path, base_dir: Path, seed: int) -> Path:
    """A small random LoRA adapter on every Linear of the base, as mlx-lm writes one."""
    mx.random.seed(seed)
    tensors = {}
    for module, (in_dims, out_dims) in base_linear_shapes(base_dir).items():
        tensors[f"{module}.lora_a"] = mx.random.normal((in_dims, 4)) * 0.01
        tensors[f"{module}.lora_b"] = mx.zeros((4, out_dims))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), tensors)
    layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    config = {
        "fine_tune_type": "lora",
        "num_layers": layers,
        "lora_parameters": {"rank": 4, "scale": 8.0, "dropout": 0},
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def seed_home(home: Path, base_dir: Path) -> None:
    registry = Registry(home / "adapters")
    sources = home.parent / "sources"
    cpt = registry.register(
        write_adapter(sources / "cpt", base_dir, 1), ADAPTER, base_id=MODEL, base_dir=base_dir, stage="cpt",
        data_hash="c0ffee" * 6,
    )  # fmt: skip
    report = {
        "passed": True,
        "reasons": [],
        "rates": {
            "base": {"domain_accuracy": 0.1, "retention": 0.9, "leakage_rate": 0.0},
            "candidate": {"domain_accuracy": 0.8, "retention": 0.85, "leakage_rate": 0.05},
        },
        "table": [
            {"set": "domain", "question": "What does SolverX solve?", "base": "I do not know.", "fine_tuned": EVIL},
            {"set": "retention", "question": "What is 2+2?", "base": "4", "fine_tuned": "4"},
        ],
    }
    registry.register(
        write_adapter(sources / "sft", base_dir, 2), ADAPTER, base_id=MODEL, base_dir=base_dir, stage="sft",
        parent=cpt.version, data_hash="c0ffee" * 6, eval_report=report, promote=True,
    )  # fmt: skip

    run_dir = home / "runs" / RUN_ID
    log = RunLog(run_dir)
    log.write("started", adapter=ADAPTER, run_id=RUN_ID)
    log.write("ingested", snapshot="c0ffee", quarantined=[{"path": "broken.jsonl", "reason": EVIL, "partial": False}])
    log.write("finished", state="succeeded", version=2, reasons=[])
    losses = [(step, 3.0 / (1 + 0.3 * step)) for step in range(1, 21)]
    stages = [
        StageResult(
            stage="cpt", adapter_dir=run_dir / "cpt", steps=20, losses=losses, val_losses=[(10, 1.4), (20, 1.0)]
        ),
        StageResult(stage="sft", adapter_dir=run_dir / "sft", steps=20, losses=[(s, x * 0.6) for s, x in losses]),
    ]
    _save_loss_chart(stages, run_dir / "loss.png")

    outside = home.parent / "outside-run"  # a run entry that links out of the state directory is never served
    outside.mkdir()
    shutil.copyfile(run_dir / "loss.png", outside / "loss.png")
    (home / "runs" / "linked-run").symlink_to(outside, target_is_directory=True)

    inbox = home / "inbox" / ADAPTER
    inbox.mkdir(parents=True)
    (inbox / "notes.md").write_text("# SolverX\nSolverX schedules solver jobs.\n")
    (inbox / "qa").mkdir()
    (inbox / "qa" / "faq.jsonl").write_text('{"question": "What is SolverX?", "answer": "A solver service."}\n')
    (inbox / ".hidden").write_text("ignored")
    (home / "inbox" / "Bad Name").mkdir()

    quarantine = home / "quarantine" / ADAPTER / RUN_ID
    quarantine.mkdir(parents=True)
    (quarantine / "broken.jsonl").write_text("{not json\n")
    (quarantine / "broken.jsonl.reason").write_text(f"broken.jsonl: not used\nline 1: {EVIL}\n")
    (quarantine / "huge.bin.reason").write_text("huge.bin: not used\nlarger than the 64 MiB limit\n")


@pytest.fixture(scope="module")
def daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from serving import link_model, serve_daemon

    home = tmp_path_factory.mktemp("dashboard") / "home"
    seed_home(home, link_model(home, tiny_model_dir))
    with serve_daemon(home, tiny_model_dir, ("--api-key", KEY, "--train-debounce-seconds", "3600")) as server:
        yield server


# -- the APIs the page reads ---------------------------------------------------------------------------------


def test_inbox_lists_files_and_quarantine_reasons(daemon):
    assert httpx.get(daemon.api_url + "/inbox").status_code == 401
    body = httpx.get(daemon.api_url + "/inbox", headers=AUTH).json()
    folders = {folder["adapter"]: folder for folder in body["inbox"]}
    assert set(folders) == {ADAPTER, "Bad Name"} and not folders["Bad Name"]["valid"]
    files = {f["path"]: f for f in folders[ADAPTER]["files"]}
    assert set(files) == {"notes.md", "qa/faq.jsonl"}  # hidden files do not count
    assert files["notes.md"]["size"] == len("# SolverX\nSolverX schedules solver jobs.\n")
    assert files["notes.md"]["mtime"] > 0

    quarantined = {q["path"]: q for q in body["quarantine"]}
    assert set(quarantined) == {"broken.jsonl", "huge.bin"}
    broken = quarantined["broken.jsonl"]
    assert (broken["adapter"], broken["run"], broken["copied"]) == (ADAPTER, RUN_ID, True)
    assert broken["reason"] == f"broken.jsonl: not used\nline 1: {EVIL}"
    assert quarantined["huge.bin"]["copied"] is False and quarantined["huge.bin"]["size"] is None


def test_loss_chart_is_served_only_from_a_run_directory(daemon):
    chart = httpx.get(f"{daemon.api_url}/training/{RUN_ID}/loss.png", headers=AUTH)
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/png"
    assert chart.content.startswith(PNG_MAGIC)
    for run_id in ("no-such-run", "linked-run", "..", "%2E%2E", "..%2F..%2Foutside-run"):
        refused = httpx.get(f"{daemon.api_url}/training/{run_id}/loss.png", headers=AUTH)
        assert refused.status_code == 404, run_id
    assert httpx.get(f"{daemon.api_url}/training/{RUN_ID}/loss.png").status_code == 401


def test_page_shell_holds_no_data_and_loads_nothing_from_elsewhere(daemon):
    page = httpx.get(daemon.base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    script = httpx.get(daemon.base_url + "/dashboard.js")
    style = httpx.get(daemon.base_url + "/dashboard.css")
    assert script.headers["content-type"].startswith("text/javascript") and style.status_code == 200
    for text in (page.text, script.text, style.text):
        assert MODEL not in text and ADAPTER + "@" not in text and str(daemon.home) not in text
        assert "http://" not in text and "https://" not in text
    assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text


# -- the page in a browser -----------------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Debian's Chromium driven by its chromedriver; selenium-manager is never asked to download anything."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if chromium is None or driver_path is None:
        pytest.skip(
            "headless dashboard test needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # Chromium dies at start with the OpenBLAS that ./run test preloads for MLX; selenium must not go online.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"SE_OFFLINE": "true"}
    os.environ.setdefault("SE_OFFLINE", "true")
    service = webdriver.ChromeService(executable_path=driver_path, env=env)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# Adds a running run to what GET /v1/training answers, as a training child would report it.
FAKE_RUNNING_RUN = """
const realFetch = window.fetch;
window.fetch = async (input, init) => {
  const response = await realFetch(input, init);
  if (String(input) !== "/v1/training" || !response.ok) return response;
  const body = await response.json();
  body.data.unshift({run_id: "20990101T000000000000Z-solverx", adapter: "solverx", state: "running", stage: "sft",
    progress: {stage: "sft", step: 5, total: 20, loss: 1.2341, tokens_per_second: 321.6, eta_seconds: 75},
    version: null, reasons: [], error: null, started: Date.now() / 1000, finished: null, quarantined: []});
  return new Response(JSON.stringify(body), {status: 200, headers: {"Content-Type": "application/json"}});
};
"""


def test_dashboard_in_chromium(browser, daemon):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)

    def find(css: str):
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, css))

    browser.get(daemon.base_url + "/")
    find("#key-form:not([hidden])")  # the server wants a key: the page asks for it once
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()

    assert find(f'#bases tr[data-model="{MODEL}"]').text.startswith(MODEL)
    browser.execute_script(FAKE_RUNNING_RUN)  # a training run in progress, without spending minutes on one
    adapter = find(f'#adapters [data-adapter="{ADAPTER}"]')
    assert "serving v2" in adapter.text and "solverx-tiny → v1 cpt → v2 sft" in adapter.text
    report = find(f'#adapters details[data-report="{ADAPTER}@2"]')
    report.find_element(By.TAG_NAME, "summary").click()
    assert EVIL in report.text and "What does SolverX solve?" in report.text  # shown as text, never as markup

    # the recent-runs table is redrawn when the runs change: wait for the fake run before opening a chart
    live = find('#training-live .live-run[data-run="20990101T000000000000Z-solverx"]')
    assert "sft step 5/20 · loss 1.234 · 322 tok/s · ETA 1 min 15 s" in live.text
    assert live.find_element(By.CSS_SELECTOR, ".progress").get_attribute("aria-valuenow") == "25"
    run = find(f'#training-runs tr[data-run="{RUN_ID}"]')
    assert "succeeded" in run.text and "1 file(s) quarantined" in run.text
    find(f'#training-runs tr[data-loss="{RUN_ID}"] .loss-box summary').click()
    wait.until(lambda d: d.execute_script(
        "const img = document.querySelector('#training-runs img.loss'); return img && img.naturalWidth > 0;"
    ))  # fmt: skip

    assert "notes.md" in find(f'#inbox [data-inbox="{ADAPTER}"]').text
    assert EVIL in find('#quarantine tr[data-quarantined="broken.jsonl"]').text

    assert browser.find_element(By.ID, "chat-model").get_attribute("value") == MODEL
    browser.find_element(By.ID, "chat-max").clear()
    browser.find_element(By.ID, "chat-max").send_keys("24")
    browser.find_element(By.ID, "chat-temp").clear()
    browser.find_element(By.ID, "chat-temp").send_keys("0")  # greedy: the same answer on every machine
    browser.find_element(By.ID, "chat-input").send_keys("What is Python?")
    browser.find_element(By.ID, "chat-send").click()
    answer = find('#chat-log .msg.assistant[data-state="done"], #chat-log .msg.assistant[data-state="error"]')
    assert answer.get_attribute("data-state") == "done", answer.text
    assert answer.find_element(By.CSS_SELECTOR, ".body").text.strip()
    assert int(answer.get_attribute("data-chunks")) >= 2  # streamed, chunk by chunk
    assert "completion tokens" in browser.find_element(By.ID, "chat-stats").text

    injected = browser.execute_script(
        "return [window.__xss === undefined, document.querySelectorAll('img:not(.loss)').length];"
    )
    assert injected == [True, 0]

    height = browser.execute_script("window.scrollTo(0, 0); return document.documentElement.scrollHeight;")
    browser.set_window_size(1400, min(max(height + 160, 1000), 4000))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))

    browser.refresh()  # the key is kept for this tab: no second prompt
    find(f'#bases tr[data-model="{MODEL}"]')
    assert browser.find_element(By.ID, "key-form").get_attribute("hidden") is not None
