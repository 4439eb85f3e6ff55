"""``lamost-ostar report``: the static HTML vetting report (lamost_ostar.report, cli/report.py).

The catalogue is written through the catalogue's own API from real fixture spectra
(LAMOST DR1/DR6/DR7/DR9 layouts and two SDSS spectra), their line evidence measured
as the stage does, with made-up class probabilities; a deleted and a truncated file
stand for spectra that cannot be re-read.  The browser test opens the report in
Debian's headless Chromium (skips where it is not installed).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lamost_ostar import report as rep
from lamost_ostar.catalogue import Catalogue
from lamost_ostar.cli import main

DATA = Path(__file__).resolve().parent / "data"
LAMOST_FILES = ["io_image_dr7.fits", "io_image_dr6.fits.gz", "io_dr1_gzip.fits", "io_coadd_dr9.fits.gz",
                "io_nan_few.fits.gz"]
SDSS_FILES = ["sdss_spec-0945-52652-0470.fits", "sdss_spec-2488-54149-0001.fits.gz"]
HAS_SDSS_READER = any(ep.name == "sdss" for ep in entry_points(group="lamost_ostar.readers"))


def _results(paths: list[Path]):
    """StageResults for the files, evidence measured on the spectra as OStarStage does."""
    from lamost_ostar.io import read_spectrum
    from lamost_ostar.lines import measure_lines
    from lamost_ostar.preprocess import prepare
    from lamost_ostar.stage import StageResult, evidence_records, spectrum_metadata
    from lamost_ostar_plugins.sdss import SDSSReader

    spectra = [SDSSReader().read(p) if p.name.startswith("sdss_") else read_spectrum(p) for p in paths]
    prep = prepare(spectra)
    meas = measure_lines(prep.flux, prep.ivar, prep.mask)
    evidence = evidence_records(meas)
    out = []
    for k, (s, ev) in enumerate(zip(spectra, evidence)):
        p_o = 0.99 - 0.07 * k
        rest = (1.0 - p_o) / 6
        probs = {"O": p_o, **{c: rest for c in "BAFGKM"}}
        out.append(StageResult(path=s.path, ok=True, **spectrum_metadata(s), probs=probs, p_o=p_o,
                               predicted_class="O" if p_o > rest else "B", flags=0,
                               model_version="test-model", posterior_o=10 ** (-1 - 0.5 * k),
                               is_candidate=k % 3 != 2, heii_sigma=ev["heii_sigma"], evidence=ev))
    return out


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> tuple[Path, dict]:
    """A catalogue of 9 results: 7 real readable files, one deleted, one truncated."""
    root = tmp_path_factory.mktemp("release")
    paths = []
    for name in LAMOST_FILES + SDSS_FILES:
        shutil.copy(DATA / name, root / name)
        paths.append(root / name)
    results = _results(paths)
    # two more rows whose files are gone / broken by the time the report is made
    gone, broken = root / "gone.fits", root / "broken.fits"
    for extra, source in ((gone, results[0]), (broken, results[1])):
        r = type(source)(**{**vars(source), "path": str(extra), "obsid": None,
                            "designation": f"LAMOST J000000.00+00000{len(results)}.0"})
        results.append(r)
    results[-2].is_candidate, results[-1].is_candidate = True, True
    results[-2].posterior_o, results[-1].posterior_o = 0.9, 0.8   # ranks 1 and 2
    db = root / "cat.sqlite"
    with Catalogue(db) as cat:
        sid = cat.start_scan("test-model")
        cat.write(sid, results)
        cat.finish_scan(sid, {"files_seen": len(results)}, status="finished")
    broken.write_bytes((DATA / "io_image_dr7.fits").read_bytes()[:20_000])
    info = dict(n=len(results), candidates=sum(bool(r.is_candidate) for r in results),
                gone=str(gone), broken=str(broken), sdss=[str(p) for p in paths if p.name.startswith("sdss_")])
    return db, info


@pytest.fixture(scope="module")
def report_dir(catalogue, tmp_path_factory) -> tuple[Path, rep.ReportSummary]:
    db, info = catalogue
    out = tmp_path_factory.mktemp("reports") / "report"
    summary = rep.build_report(db, out, limit=500, include_non_candidates=10, workers=2)
    return out, summary


def test_report_files_rows_and_order(catalogue, report_dir):
    db, info = catalogue
    out, summary = report_dir
    n_cand = info["candidates"]
    assert summary.n_rows == info["n"] and summary.n_candidates == n_cand
    assert summary.n_non_candidates == info["n"] - n_cand and not summary.more_candidates
    # the deleted and the truncated file are listed, not fatal
    bad = {p: reason for p, reason, _ in summary.bad_files}
    assert bad.get(info["gone"]) == "unreadable" and bad.get(info["broken"]) == "truncated"
    expected_bad = 2 if HAS_SDSS_READER else 2 + len(info["sdss"])
    assert len(bad) == expected_bad and summary.n_plotted == info["n"] - expected_bad
    for name in ("index.html", "report.css", "report.js", rep.MARKER, "img/summary_p_o.png",
                 "img/summary_sky.png"):
        assert (out / name).is_file(), name
    desc = json.loads((out / rep.MARKER).read_text())
    assert desc["n_rows"] == info["n"] and desc["generator"] == "lamost_ostar report"
    pages = sorted((out / "c").glob("*.html"))
    pngs = sorted(p.name for p in (out / "img").glob("[0-9]*.png"))
    assert len(pages) == info["n"] and len(pngs) == summary.n_plotted
    from PIL import Image

    for name in pngs:
        with Image.open(out / "img" / name) as im:
            assert im.size[0] > 800 and im.size[1] > 500
            assert "Title" in im.text and "p(O)" in im.text["Title"]
    # order: candidates by posterior p(O) descending, then the non-candidates by p(O)
    html = (out / "index.html").read_text()
    body = html.split("<tbody>", 2)[2]
    kinds = re.findall(r"<tr data-kind='(cand|non)'", body)
    assert kinds == ["cand"] * n_cand + ["non"] * (info["n"] - n_cand)
    with Catalogue(db, create=False) as cat:
        table, more = rep.select_rows(cat, limit=500, include_non_candidates=10)
    post = np.asarray(table["posterior_o"], float)[:n_cand]
    assert np.all(np.diff(post) <= 0) and not more
    p_o = np.asarray(table["p_o"], float)[n_cand:]
    assert np.all(np.diff(p_o) <= 0)
    # the first two ranks are the unreadable files: their pages say why, without a plot
    page1 = (out / "c" / pages[0].name).read_text()
    assert "No plot: the file could not be re-read" in page1 and "file not found" in page1
    # a plotted page: probabilities, He II evidence, EWs, position, pipeline class, path
    page3 = (out / "c" / pages[2].name).read_text()
    for text in ("He II σ", "He II 4541", "Class probabilities", "RA, Dec", "pipeline class",
                 "../img/", "posterior p(O)", "S/N g / r / i", "quality flags"):
        assert text in page3, text
    assert "next →" in page3 and "← previous" in page3
    # nothing outside the folder: no network, no absolute links
    for f in [out / "index.html", out / "report.css", out / "report.js", *pages]:
        text = f.read_text()
        assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", text), f
        assert "@import" not in text and "url(" not in text


def test_limit_and_more_flag(catalogue, tmp_path):
    db, info = catalogue
    summary = rep.build_report(db, tmp_path / "r", limit=2, workers=1)
    assert summary.n_rows == 2 and summary.n_candidates == 2 and summary.more_candidates
    assert "more candidates" in (tmp_path / "r" / "index.html").read_text()


def test_cli_bad_arguments_are_one_line_errors(catalogue, tmp_path):
    db, _ = catalogue
    runner = CliRunner()
    not_db = tmp_path / "notes.txt"
    not_db.write_text("not a database\n" * 100)
    empty_db = tmp_path / "empty.sqlite"
    import sqlite3

    sqlite3.connect(empty_db).execute("CREATE TABLE t (x)").connection.close()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "precious.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "o1")], "no catalogue file"),
        (["--db", str(not_db), "--out", str(tmp_path / "o2")], "database"),
        (["--db", str(empty_db), "--out", str(tmp_path / "o3")], "no lamost_ostar catalogue"),
        (["--db", str(db), "--out", str(existing)], "exists (use --overwrite"),
        (["--db", str(db), "--out", str(existing), "--overwrite"], "not a lamost-ostar report"),
        (["--db", str(db), "--out", str(a_file), "--overwrite"], "not a folder"),
    ]
    for args, fragment in cases:
        res = runner.invoke(main, ["report", *args])
        assert res.exit_code == 1, (args, res.output)
        text = res.output.strip()
        assert text.startswith("Error:") and "\n" not in text and fragment in text, (args, text)
        assert "Traceback" not in res.output
    assert (existing / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    res = runner.invoke(main, ["report", "--db", str(db), "--out", str(tmp_path / "o4"), "--limit", "-1"])
    assert res.exit_code == 2 and "--limit" in res.output
    res = runner.invoke(main, ["report", "--help"])
    assert res.exit_code == 0 and "--include-non-candidates" in res.output


def test_cli_writes_and_replaces_a_report_atomically(catalogue, tmp_path, monkeypatch):
    db, info = catalogue
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", "--db", str(db), "--out", str(out), "--limit", "3",
                                    "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote a report of 3 spectra" in res.output and str(out / "index.html") in res.output
    before = (out / rep.MARKER).read_text()
    # a build that fails half-way leaves the good report in place and no temporary folder
    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(rep, "_summary_plots", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        rep.build_report(db, out, limit=5, overwrite=True, workers=1)
    assert (out / rep.MARKER).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    monkeypatch.undo()
    # --overwrite replaces an earlier report
    summary = rep.build_report(db, out, limit=5, overwrite=True, workers=1)
    assert summary.n_rows == 5 and json.loads((out / rep.MARKER).read_text())["n_rows"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert len(list((out / "c").glob("*.html"))) == 5


# --------------------------------------------------------------------------- the browser
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)

_CHECK_INDEX = """
<script>
window.addEventListener("load", function () {
  "use strict";
  var out = {};
  var imgs = Array.prototype.slice.call(document.images);
  out.images = imgs.length;
  out.images_loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var table = document.getElementById("cands");
  function rows() { return Array.prototype.slice.call(table.tBodies[0].rows); }
  function visible() { return rows().filter(function (r) { return r.style.display !== "none"; }).length; }
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function col(key) { return heads.findIndex(function (th) { return th.getAttribute("data-key") === key; }); }
  out.rows = rows().length;
  var c = col("p_o");
  heads[c].click();
  out.p_o_first_dir = heads[c].getAttribute("aria-sort");
  out.p_o_first = rows().map(function (r) { return r.cells[c].getAttribute("data-v"); });
  heads[c].click();
  out.p_o_second_dir = heads[c].getAttribute("aria-sort");
  out.p_o_second = rows().map(function (r) { return r.cells[c].getAttribute("data-v"); });
  var n = col("name");
  heads[n].click();
  out.names = rows().map(function (r) { return r.cells[n].textContent; });
  var kind = document.getElementById("kind");
  kind.value = "non"; kind.dispatchEvent(new Event("change"));
  out.visible_non = visible();
  out.shown = document.getElementById("shown").textContent;
  kind.value = "all"; kind.dispatchEvent(new Event("change"));
  var f = document.getElementById("filter");
  f.value = "sdss"; f.dispatchEvent(new Event("input"));
  out.visible_sdss = visible();
  f.value = ""; f.dispatchEvent(new Event("input"));
  out.visible_all = visible();
  // every spectrum plot of the report decodes in the browser
  var pngs = PNGS, done = 0, ok = 0;
  function finish() {
    out.plots = pngs.length; out.plots_loaded = ok;
    var pre = document.createElement("pre"); pre.id = "test-result";
    pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
  }
  if (!pngs.length) { finish(); }
  pngs.forEach(function (src) {
    var im = new Image();
    im.onload = function () { if (im.naturalWidth > 0) { ok++; } if (++done === pngs.length) { finish(); } };
    im.onerror = function () { if (++done === pngs.length) { finish(); } };
    im.src = src;
  });
});
</script>
"""

_CHECK_PAGE = """
<script>
window.addEventListener("load", function () {
  var img = document.querySelector("img.plot");
  var out = {has_img: !!img, loaded: !!img && img.complete && img.naturalWidth > 0,
             width: img ? img.naturalWidth : 0,
             links: Array.prototype.map.call(document.querySelectorAll("nav a"), function (a) { return a.textContent; })};
  var pre = document.createElement("pre"); pre.id = "test-result";
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>
"""


def _chromium(url: str, profile: Path, *extra: str, timeout: float = 60.0) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={profile}", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _result(dom: str) -> dict:
    m = re.search(r'<pre id="test-result">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    import html as _html

    return json.loads(_html.unescape(m.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y "
                                             "chromium); the report's browser test needs it")
def test_report_in_headless_chromium(report_dir, tmp_path):
    out, summary = report_dir
    t0 = time.perf_counter()
    # a copy of the summary page with a check script appended (same folder: same relative links)
    pngs = sorted(f"img/{p.name}" for p in (out / "img").glob("[0-9]*.png"))
    index = (out / "index.html").read_text()
    probe = out / "index_probe.html"
    probe.write_text(index.replace("</body>", _CHECK_INDEX.replace("PNGS", json.dumps(pngs)) + "</body>"))
    try:
        dom = _chromium(probe.as_uri(), tmp_path / "profile1", "--virtual-time-budget=15000",
                        "--dump-dom")
        res = _result(dom)
        page = out / "c" / "0003_probe.html"
        page.write_text((out / "c" / "0003.html").read_text().replace("</body>", _CHECK_PAGE + "</body>"))
        page_res = _result(_chromium(page.as_uri(), tmp_path / "profile2", "--virtual-time-budget=5000",
                                     "--dump-dom"))
        shot = tmp_path / "index.png"
        _chromium((out / "index.html").as_uri(), tmp_path / "profile3", "--window-size=1280,1600",
                  "--hide-scrollbars", f"--screenshot={shot}")
    finally:
        probe.unlink(missing_ok=True)
        (out / "c" / "0003_probe.html").unlink(missing_ok=True)
    n = summary.n_rows
    # the summary images and every spectrum plot load
    assert res["images"] == 2 and res["images_loaded"] == 2, res
    assert res["plots"] == summary.n_plotted and res["plots_loaded"] == summary.n_plotted, res
    # the table: every row, numeric sort descending then ascending, text sort, filters
    assert res["rows"] == n
    first = [float(v) for v in res["p_o_first"]]
    second = [float(v) for v in res["p_o_second"]]
    assert res["p_o_first_dir"] == "descending" and first == sorted(first, reverse=True)
    assert res["p_o_second_dir"] == "ascending" and second == sorted(second)
    assert res["names"] == sorted(res["names"], key=str.lower)
    assert res["visible_non"] == summary.n_non_candidates
    assert res["shown"] == f"{summary.n_non_candidates} of {n} shown"
    assert res["visible_sdss"] == 2 and res["visible_all"] == n
    # a spectrum page: its plot loads, navigation is there
    assert page_res["has_img"] and page_res["loaded"] and page_res["width"] > 800, page_res
    assert page_res["links"][0] == "↑ summary" and "next →" in page_res["links"]
    # the screenshot shows a rendered page (text, plots and colours, not a blank)
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert im.size == (1280, 1600) and colours is not None and len(colours) > 200
    assert time.perf_counter() - t0 < 60


def test_empty_catalogue_and_unknown_model(tmp_path):
    """A catalogue without candidates still gives a (near-empty) report; an unknown --model is an error."""
    db = tmp_path / "empty.sqlite"
    with Catalogue(db) as cat:
        sid = cat.start_scan("m1")
        cat.finish_scan(sid, {"files_seen": 0}, status="finished")
    summary = rep.build_report(db, tmp_path / "r", workers=2)
    assert summary.n_rows == 0 and summary.n_plotted == 0 and not summary.bad_files
    html = (tmp_path / "r" / "index.html").read_text()
    assert "<b>0</b>O candidates" in html and (tmp_path / "r" / "img" / "summary_sky.png").is_file()
    res = CliRunner().invoke(main, ["report", "--db", str(db), "--out", str(tmp_path / "r2"),
                                    "--model", "nope"])
    assert res.exit_code == 1 and "no result rows of model version 'nope'" in res.output
    assert not (tmp_path / "r2").exists()
