"""fla-ds report on a real small run (stage 1, 2 epochs, an evaluation after each): the page is
checked as HTML (standard library's html.parser) against the run's own files and shards, and
opened from a file:// URL in headless Chromium driven by Selenium (Debian's chromium and
chromium-driver; `make test` installs them when missing and it can, else the browser test
skips, saying why). Hostile ids and texts are shown as text, never run; a folder that is not a
run is one line and exit 2; a run whose shards are gone still gets its page."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import env, run, synthetic_shards, train_cmd, train_tiny_tokenizer

from fla_ds.cli import main
from fla_ds.config import load_config, save_resolved
from fla_ds.evaluate.metrics import prepare, rouge_l_sentence, score
from fla_ds.hypotheses import format_records, read_tsv

HOSTILE_ID = "<script>alert('id')</script>\"&'"
HOSTILE_HYPOTHESIS = "<img src=x onerror=alert(2)>"
HOSTILE_REFERENCE = "</td><script>document.title='pwned'</script>"


# ------------------------------------------------------------------ the page, parsed


class Page(HTMLParser):
    """What the tests look at: every tag's attributes, the clip rows, the problem lines."""

    def __init__(self, html: str):
        super().__init__()  # convert_charrefs: text and attribute values come back unescaped
        self.attrs: list[tuple[str, dict]] = []
        self.rows: list[dict] = []
        self.problems: list[str] = []
        self.row: dict | None = None
        self.cell: dict | None = None
        self.problem: list[str] | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs.append((tag, a))
        classes = (a.get("class") or "").split()
        if tag == "tr" and "clip" in classes:
            self.row = {"section": a["data-section"], "data_id": a["data-id"], "hyps": {}, "imgs": 0}
        elif tag == "td" and self.row is not None:
            self.cell = {"classes": classes, "step": a.get("data-step"), "text": []}
        elif tag == "img" and self.row is not None:
            self.row["imgs"] += 1
        elif tag == "p" and "problem" in classes:
            self.problem = []

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"].append(data)
        if self.problem is not None:
            self.problem.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None and self.row is not None:
            cell, value = self.cell, "".join(self.cell["text"])
            if "hyp" in cell["classes"]:
                self.row["hyps"][cell["step"]] = None if "missing" in cell["classes"] else value
            for name in ("id", "ref", "score"):
                if name in cell["classes"]:
                    self.row[name] = value
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.rows.append(self.row)
            self.row = None
        elif tag == "p" and self.problem is not None:
            self.problems.append("".join(self.problem))
            self.problem = None

    def tags(self, name: str) -> list[dict]:
        return [a for t, a in self.attrs if t == name]


def page_of(path: Path) -> Page:
    return Page(path.read_text("utf-8"))


def report_cmd(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fla_ds", "report", str(run_dir), *args]


def shard_texts(shards: Path, split: str = "dev") -> dict[str, str]:
    """id -> text of every sample of a split, read straight from the tars (not by fla_ds)."""
    texts = {}
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    texts[meta["id"]] = meta["text"]
    return texts


def sentence(hypothesis: str, reference: str) -> float:
    return rouge_l_sentence(prepare(hypothesis).split(), prepare(reference).split())


def evaluations(run_dir: Path) -> dict[str, list[dict]]:
    return {d.name: read_tsv(d / "hypotheses.tsv") for d in sorted((run_dir / "eval").glob("step-*"), key=lambda d: int(d.name[5:]))}


# ------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Stage 1 for 2 epochs (12 steps), evaluated on all 8 dev clips after each; its report
    made by the command a user runs; and a copy of the run whose latest hypotheses were
    rewritten to spread the sentence scores, with one hostile row."""
    root = tmp_path_factory.mktemp("report")
    assets = {"shards": synthetic_shards(root), "tokenizer": train_tiny_tokenizer(root / "tokenizer")}
    out = root / "run"
    run(train_cmd(assets, out, 1, "train.epochs=2", "train.max_steps=12", "eval.limit=0"))
    proc = run(report_cmd(out), timeout=120)
    # the copy leaves the checkpoints out (the report reads none of them)
    top_level = lambda folder, names: [n for n in names if Path(folder) == out and (n.startswith("step-") or n == "report.html")]
    hostile = Path(shutil.copytree(out, root / "hostile", ignore=top_level))
    rewrite_latest_hypotheses(hostile)
    return {"run": out, "shards": assets["shards"], "stdout": proc.stdout, "hostile": hostile, "root": root}


def rewrite_latest_hypotheses(run_dir: Path) -> None:
    """Hypotheses of the latest evaluation that score from 0 to 100, and a hostile clip."""
    latest = list(evaluations(run_dir))[-1]
    path = run_dir / "eval" / latest / "hypotheses.tsv"
    rows = []
    for i, row in enumerate(read_tsv(path)):
        words = row["reference"].split()
        hypothesis = [row["reference"], " ".join(words[: len(words) // 2]), " ".join(words[::-1]), "quatsch"][i % 4]
        rows.append((row["id"], hypothesis, row["reference"]))
    rows.append((HOSTILE_ID, HOSTILE_HYPOTHESIS, HOSTILE_REFERENCE))
    path.write_text("".join(line + "\n" for line in format_records(("id", "hypothesis", "reference"), rows)), "utf-8")


def test_the_page_shows_the_run_its_scores_and_every_clip(trained):
    out = trained["run"]
    path = out / "report.html"
    assert trained["stdout"].strip() == str(path)
    page = page_of(path)
    # Nothing is loaded from anywhere: images are data: URIs, links point inside the page.
    for tag, attrs in page.attrs:
        for name in ("src", "href", "xlink:href", "action", "srcset", "poster"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), (tag, name, value[:80])
    assert not page.tags("script") and not page.tags("link") and not page.tags("iframe")
    # One row per clip of the latest evaluation, each with its frames and the shard's text.
    evals = evaluations(out)
    assert list(evals) == ["step-6", "step-12"]
    latest = evals["step-12"]
    texts = shard_texts(trained["shards"])
    assert len(page.rows) == len(latest) == 8
    assert sorted(r["id"] for r in page.rows) == sorted(r["id"] for r in latest)
    for row in page.rows:
        assert row["data_id"] == row["id"]
        assert row["ref"] == texts[row["id"]]
        assert row["imgs"] == 6
        # each checkpoint's hypothesis, as its hypotheses.tsv holds it
        assert row["hyps"] == {step: {r["id"]: r["hypothesis"] for r in rows}[row["id"]] for step, rows in evals.items()}
    html = path.read_text("utf-8")
    for expected in ("dev bleu4", "signjoey convention", "eval.beam_size", "synthetic / dev", "finished at step 12 of 12"):
        assert expected in html, expected
    assert html.count("<svg") >= 3


def test_clips_are_ordered_worst_first_and_hostile_text_is_only_text(trained):
    hostile = trained["hostile"]
    main_rc = main(["report", str(hostile), "--clips", "4"])
    assert main_rc == 0
    page = page_of(hostile / "report.html")
    latest = list(evaluations(hostile).values())[-1]
    assert len(page.rows) == len(latest) == 9
    expected = {r["id"]: 100 * sentence(r["hypothesis"], r["reference"]) for r in latest}
    sections = {s: [r for r in page.rows if r["section"] == s] for s in ("worst", "best", "rest")}
    assert [len(v) for v in sections.values()] == [2, 2, 5]
    worst, best, rest = ([expected[r["id"]] for r in rows] for rows in sections.values())
    assert worst == sorted(worst) and best == sorted(best, reverse=True) and rest == sorted(rest)
    assert max(worst) <= min(rest) and max(rest) <= min(best)
    assert worst[0] == min(expected.values()) and best[0] == max(expected.values()) == 100
    assert all(float(r["score"]) == pytest.approx(expected[r["id"]], abs=0.05) for r in page.rows)
    # only the worst and best get frames; the page says how many were left out
    assert [r["imgs"] for r in sections["rest"]] == [0] * 5
    html = (hostile / "report.html").read_text("utf-8")
    assert "Frames are shown for 4 of 9 clips" in html
    # The hostile row is text: escaped in the file, read back exactly, no tag made of it.
    row = next(r for r in page.rows if r["id"] == HOSTILE_ID)
    assert row["data_id"] == HOSTILE_ID and row["ref"] == HOSTILE_REFERENCE and row["hyps"]["step-12"] == HOSTILE_HYPOTHESIS
    assert not page.tags("script") and "<script>" not in html and "&lt;script&gt;" in html
    assert all(a.get("src", "data:").startswith("data:") for a in page.tags("img"))


# ------------------------------------------------------------------ in a browser


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium under Selenium, every wait bounded: driver start (Selenium polls the
    driver for at most ~30 s), every request to it (60 s socket timeout), page loads (30 s),
    scripts (10 s). Skips, saying why, when the browser or driver is missing or won't start."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    binary = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no chromium or chromedriver on PATH (make test installs Debian's chromium and chromium-driver when run as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # as root in a container: no sandbox; no background connections (this machine's network is closed)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions", "--no-first-run", "--disable-quic",
                 "--window-size=1400,2000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager never downloads a driver
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # Selenium's client config takes it as its HTTP timeout
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except Exception as exc:  # the browser cannot start here: say why in one line
        pytest.skip(f"chromium did not start under chromedriver: {str(exc).splitlines()[0][:300]}")
    finally:
        socket.setdefaulttimeout(previous)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> list[dict]:
    """Load the page from file:// and return its console log."""
    driver.get_log("browser")  # what earlier pages left
    driver.get(path.resolve().as_uri())
    return driver.get_log("browser")


def test_the_page_renders_in_a_browser_offline(trained, browser):
    log = open_page(browser, trained["run"] / "report.html")
    assert not [e for e in log if e["level"] == "SEVERE"], log
    paths_per_svg = browser.execute_script(
        "return Array.from(document.querySelectorAll('figure svg')).map(s => "
        "[s.querySelectorAll('path').length, s.getBoundingClientRect().width, s.getBoundingClientRect().height])")
    assert len(paths_per_svg) >= 3 and all(n > 0 and w > 0 and h > 0 for n, w, h in paths_per_svg), paths_per_svg
    images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == 8 * 6 and all(done and w > 0 and h > 0 for done, w, h in images), images
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, "table.clips tr.clip")
    assert len(rows) == 8 and all(r.is_displayed() for r in rows)


def test_hostile_text_runs_nothing_in_a_browser(trained, browser):
    if not (trained["hostile"] / "report.html").is_file():
        main(["report", str(trained["hostile"]), "--clips", "4"])
    log = open_page(browser, trained["hostile"] / "report.html")
    title = browser.title  # an alert() would make this raise UnexpectedAlertPresentException
    assert not [e for e in log if e["level"] == "SEVERE"], log
    assert title.startswith("fla-ds report") and "pwned" not in title
    assert browser.execute_script("return document.scripts.length") == 0
    from selenium.webdriver.common.by import By

    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "tr.clip td.id")]
    assert HOSTILE_ID in cells


# ------------------------------------------------------------------ without training


def fake_run(folder: Path, shards: Path) -> Path:
    """A run folder as train.py leaves it, written by hand: config, log, one evaluation."""
    folder.mkdir(parents=True)
    save_resolved(load_config(None, [f"stream.shards={shards}", f"train.out={folder}"]), folder)
    records = [{"time": 0.0, "step": s, "epoch": 0, "loss": 5.0 - s, "lr": 1e-3 / s} for s in (1, 2)]
    records.append({"time": 0.0, "event": "eval", "step": 2, "epoch": 0, "bleu4": 0.0, "rouge_l": 50.0, "n": 2})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [("a", "guten abend", "guten abend"), ("b", "quatsch", "liebe zuschauer")]
    step = folder / "eval" / "step-2"
    step.mkdir(parents=True)
    (step / "hypotheses.tsv").write_text("".join(line + "\n" for line in format_records(("id", "hypothesis", "reference"), rows)))
    (step / "metrics.json").write_text(json.dumps(score([h for _, h, _ in rows], [r for _, _, r in rows])))
    return folder


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(report_cmd(tmp_path), env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert f"{tmp_path}: not a run folder" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("damage, named", [
    (lambda r: (r / "config.yaml").unlink(), "config.yaml"),
    (lambda r: (r / "eval" / "step-2" / "hypotheses.tsv").write_text("id\thypothesis\treference\nonly-one-field\n"), "hypotheses.tsv"),
    (lambda r: (r / "best").write_text("{not json"), "best"),
    (lambda r: (r / "eval" / "step-2" / "hypotheses.tsv").unlink() or (r / "eval" / "step-2" / "hypotheses.tsv").symlink_to(r.parent / "secret.tsv"),
     "leads outside"),
])
def test_a_damaged_run_file_is_one_line_naming_it(tmp_path, capsys, damage, named):
    (tmp_path / "secret.tsv").write_text("id\thypothesis\treference\nx\ty\tz\n")
    folder = fake_run(tmp_path / "run", tmp_path / "gone")
    damage(folder)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fla-ds: error: ") and named in err, err
    assert not (folder / "report.html").exists()


def test_a_run_whose_shards_are_gone_still_gets_its_page(tmp_path, capsys):
    folder = fake_run(tmp_path / "run", tmp_path / "gone")
    assert main(["report", str(folder), "--out", str(tmp_path / "page.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "page.html")
    page = page_of(tmp_path / "page.html")
    assert [r["id"] for r in page.rows] == ["b", "a"]  # worst first
    assert all(r["imgs"] == 0 for r in page.rows)
    assert len(page.problems) == 1 and page.problems[0].startswith("no frames: ") and "index.json does not exist" in page.problems[0]
    assert (tmp_path / "page.html").read_text().count("<svg") == 3
    assert main(["report", str(folder), "--clips", "-1"]) == 2


def test_a_stage2_run_from_a_feature_cache_takes_its_frames_from_the_encoders_shards(trained, tmp_path):
    stage1 = trained["run"]
    folder = fake_run(tmp_path / "stage2", tmp_path / "gone")
    cfg = load_config(str(folder / "config.yaml"), [f"stage2.encoder={stage1}", f"stage2.features={tmp_path / 'features'}"])
    save_resolved(cfg, folder)
    texts = shard_texts(trained["shards"])
    rows = [(i, "guten abend", texts[i]) for i in sorted(texts)[:3]]
    (folder / "eval" / "step-2" / "hypotheses.tsv").write_text("".join(line + "\n" for line in format_records(("id", "hypothesis", "reference"), rows)))
    assert main(["report", str(folder)]) == 0
    page = page_of(folder / "report.html")
    assert [r["imgs"] for r in page.rows] == [6, 6, 6] and not page.problems
    html = (folder / "report.html").read_text("utf-8")
    assert "2: frozen stage-1 encoder" in html and "synthetic / dev" in html


def test_a_resumed_log_keeps_the_later_record_of_a_step_and_skips_a_cut_line(tmp_path):
    from fla_ds.report.run import read_metrics

    lines = [json.dumps({"time": 0, "step": s, "loss": float(s)}) for s in (1, 2, 3)]
    lines.append('{"time": 0, "step": 4, "lo')  # a write cut short by a kill
    lines += [json.dumps({"time": 1, "step": s, "loss": 10.0 + s}) for s in (3, 4)]  # resumed from step 2
    lines.append(json.dumps({"time": 1, "event": "eval", "step": 4, "bleu4": 1.5, "n": 8}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    log = read_metrics(tmp_path)
    assert {s: r["loss"] for s, r in log.steps.items()} == {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0}
    assert log.damaged == [4] and log.evals == {4: {"bleu4": 1.5, "n": 8}}
