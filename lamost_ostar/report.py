"""Static HTML vetting report of the O-star candidates in a catalogue.

:func:`build_report` writes a folder that opens in any browser from the disk
(no server, no network: the CSS and the small table script are local files)::

    OUT/index.html          summary: counts, p(O) histograms, the candidates on the
                            sky, counts by pipeline class, a sortable, filterable table
                            of every spectrum in the report, files that could not be re-read
    OUT/c/0001.html ...     one page per spectrum, in rank order (prev / next links)
    OUT/img/0001.png ...    its plot
    OUT/img/summary_*.png   the summary plots
    OUT/report.css, OUT/report.js
    OUT/report.json         what was written (and the marker that lets --overwrite
                            replace the folder)

Rows
    The model's O candidates (``is_candidate``: the model card's decision on the
    posterior p(O) and the He II evidence; p(O) >= 0.5 for model versions without a
    decision), best first: by ``posterior_o`` then ``p_o``; at most ``limit``.
    Optionally the ``include_non_candidates`` rows of highest p(O) that the
    decision rejected, after them and marked, for comparison.
Data
    Only the catalogue's public query API (:meth:`lamost_ostar.catalogue.Catalogue.query`)
    and the spectrum files: each file is re-read (:func:`lamost_ostar.io.read_spectra`,
    or the reader of the ``lamost_ostar.readers`` entry-point group named like the
    row's ``layout``, e.g. ``sdss``) and put on the common grid with
    :func:`lamost_ostar.preprocess.prepare`, in vectorised batches.  A file that
    cannot be read any more (moved, corrupt) is listed on the summary page with its
    reason; its page shows the catalogue values without a plot.
Plot (per spectrum)
    (1) the resampled flux over the whole grid (3690-9100 A, divided by its median;
    masked and interpolated pixels left out), (2) the classification region
    3880-5050 A in continuum-normalised flux (``prepare(...).xn``) with He II
    4200/4541/4686, He I 4026/4471/4922, H-beta/H-gamma/H-delta and Ca II K marked,
    (3) zoom panels (+-25 A, ``xn``) on the six He lines with the EW window shaded and
    the catalogue's box EW +- error in each title.  Vacuum wavelengths, as on the grid.
Speed
    Rendering (matplotlib Agg) runs in ``workers`` processes, each reusing one figure
    and updating its artists; reading and preparing the next batch overlaps with it.
    ``scripts/bench_report.py`` measures a 500-spectrum report.
Safety
    The report is written to a temporary folder next to ``out`` and renamed into
    place at the end, so a failed or interrupted run never leaves a half-written
    report in place of a good one.  An existing ``out`` is replaced only with
    ``overwrite=True`` and only if it is an earlier report (it holds
    ``report.json``) or empty.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LIMIT",
    "MARKED_LINES",
    "ZOOM_LINES",
    "MARKER",
    "ReportError",
    "ReportSummary",
    "build_report",
    "select_rows",
]

#: Default number of candidates in a report.
DEFAULT_LIMIT = 500
#: Lines marked on the plots (names of :data:`lamost_ostar.lines.LINES`).
MARKED_LINES: tuple[str, ...] = ("caii_k", "hei_4026", "hdelta", "heii_4200", "hgamma", "hei_4471",
                                 "heii_4541", "heii_4686", "hbeta", "hei_4922")
#: Lines with a zoom panel (continuum-normalised flux).
ZOOM_LINES: tuple[str, ...] = ("heii_4200", "heii_4541", "heii_4686", "hei_4026", "hei_4471",
                               "hei_4922")
#: Half width [A] of a zoom panel.
ZOOM_HALF_WIDTH = 25.0
#: Wavelength range [A] of the classification-region panel.
BLUE_RANGE = (3880.0, 5050.0)
#: File whose presence marks a folder as a report (and holds its description).
MARKER = "report.json"
#: Spectra read, prepared and sent to the renderers together.
BATCH = 64
#: Spectra per rendering task.
TASK = 16

_SHORT = {"caii_k": "Ca II K", "hei_4026": "He I 4026", "hdelta": "Hδ", "heii_4200": "He II 4200",
          "hgamma": "Hγ", "hei_4471": "He I 4471", "heii_4541": "He II 4541",
          "heii_4686": "He II 4686", "hbeta": "Hβ", "hei_4922": "He I 4922"}
_IO_LAYOUTS = ("image", "dr1", "coadd")
_CLASS_COLUMNS = ("p_o", "p_b", "p_a", "p_f", "p_g", "p_k", "p_m", "p_x")
_EW_LINES = ("heii_4200", "heii_4541", "heii_4686", "heii_5411", "hei_4026", "hei_4471", "hei_4922",
             "hgamma", "hbeta")


class ReportError(ValueError):
    """A bad argument or an unusable catalogue, with a one-line message."""


@dataclass
class ReportSummary:
    """What :func:`build_report` wrote.

    Attributes
    ----------
    out : pathlib.Path
        The report folder (``out/index.html`` is the summary page).
    n_rows, n_candidates, n_non_candidates : int
        Spectra in the report, of which the model's candidates and the compared
        non-candidates.
    more_candidates : bool
        True if the catalogue holds more candidates than ``limit``.
    n_plotted : int
        Spectra whose plot was written.
    bad_files : list of (path, reason, message)
        Files that could not be re-read (listed on the summary page).
    seconds : float
        Wall time of the whole build.
    timings : dict
        Seconds per phase (``query``, ``read_prepare``, ``render_wait``, ``summary``,
        ``html``, ``total``).
    """

    out: Path
    n_rows: int
    n_candidates: int
    n_non_candidates: int
    more_candidates: bool
    n_plotted: int
    bad_files: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- small helpers
def _table_lists(table) -> dict[str, list]:
    """Columns as Python lists (None for masked or non-finite values): fast cell access."""
    out = {}
    for name in table.colnames:
        col = table[name]
        values = col.tolist()
        if col.dtype.kind == "f":
            values = [None if v is None or not math.isfinite(v) else v for v in values]
        elif col.dtype.kind == "S":
            values = [None if v is None else v.decode() for v in values]
        out[name] = values
    return out


def _value(data: dict[str, list], name: str, i: int) -> Any:
    """A cell of :func:`_table_lists` (None for a missing column)."""
    col = data.get(name)
    return None if col is None else col[i]


def _column_float(table, name: str) -> np.ndarray:
    if name not in table.colnames or len(table) == 0:
        return np.full(len(table), np.nan)
    col = table[name]
    data = np.ma.filled(np.ma.asarray(col, dtype=np.float64), np.nan) if hasattr(col, "mask") \
        else np.asarray(col, dtype=np.float64)
    return np.asarray(data, dtype=np.float64)


def _fmt(v: Any, spec: str = ".3f", none: str = "—") -> str:
    if v is None:
        return none
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)) and not spec.endswith("e"):
        return str(int(v))
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _sexagesimal(ra: float | None, dec: float | None) -> str:
    if ra is None or dec is None:
        return "—"
    h = (ra % 360.0) / 15.0
    hh, mm = int(h), int((h - int(h)) * 60)
    ss = (h - hh) * 3600 - mm * 60
    sign = "-" if dec < 0 else "+"
    ad = abs(dec)
    dd, dm = int(ad), int((ad - int(ad)) * 60)
    ds = (ad - dd) * 3600 - dm * 60
    return f"{hh:02d}:{mm:02d}:{ss:05.2f} {sign}{dd:02d}:{dm:02d}:{ds:04.1f}"


def _name(data: dict[str, list], i: int) -> str:
    for key in ("designation", "obsid"):
        v = _value(data, key, i)
        if v is not None:
            return str(v)
    return os.path.basename(str(_value(data, "path", i) or f"row {i + 1}"))


# --------------------------------------------------------------------------- selection
def select_rows(cat, *, limit: int = DEFAULT_LIMIT, include_non_candidates: int = 0,
                model_version: str | None = None):
    """The report's rows from a catalogue (public query API only).

    Returns
    -------
    table : astropy.table.Table
        Candidates best first (``posterior_o`` then ``p_o``, descending; NULL last),
        then the compared non-candidates by p(O); a bool column ``in_candidates``
        says which is which.
    more : bool
        The catalogue holds more than ``limit`` candidates.
    """
    from astropy.table import vstack

    cand = cat.query(candidates=True, sort="posterior_o", descending=True, limit=limit + 1,
                     model_version=model_version)
    more = len(cand) > limit
    cand = cand[:limit]
    post, p_o = _column_float(cand, "posterior_o"), _column_float(cand, "p_o")
    order = np.lexsort((-np.nan_to_num(p_o, nan=-1.0), np.isnan(p_o),
                        -np.nan_to_num(post, nan=-1.0), np.isnan(post)))
    cand = cand[order]
    cand["in_candidates"] = np.ones(len(cand), dtype=bool)
    parts = [cand]
    if include_non_candidates > 0:
        non = cat.query(candidates=False, sort="p_o", descending=True, limit=int(include_non_candidates),
                        model_version=model_version)
        non["in_candidates"] = np.zeros(len(non), dtype=bool)
        parts.append(non)
    table = parts[0] if len(parts) == 1 else vstack(parts, metadata_conflicts="silent")
    return table, more


# --------------------------------------------------------------------------- reading
def _reader_for(layout: str, cache: dict) -> Any:
    """The ``lamost_ostar.readers`` entry point named ``layout`` (instantiated), or None."""
    if layout in cache:
        return cache[layout]
    from importlib.metadata import entry_points

    reader = None
    for ep in entry_points(group="lamost_ostar.readers"):
        if ep.name == layout:
            try:
                reader = ep.load()()
            except Exception:  # noqa: BLE001 - a broken plugin: its files are listed as unreadable
                reader = None
            break
    cache[layout] = reader
    return reader


def _read(paths: Sequence[str], layouts: Sequence[str | None], readers: dict
          ) -> tuple[list[Any], dict[int, tuple[str, str, str]]]:
    """Read the files (``None`` where unreadable) and the failures by index."""
    from lamost_ostar.io import ReadError, read_spectra

    out: list[Any] = [None] * len(paths)
    failed: dict[int, tuple[str, str, str]] = {}
    lamost = [i for i, lay in enumerate(layouts) if lay in _IO_LAYOUTS or lay is None]
    if lamost:
        batch = read_spectra([paths[i] for i in lamost], engine="native")
        by_path: dict[str, list[int]] = {}
        for i in lamost:
            by_path.setdefault(paths[i], []).append(i)
        for s in batch.spectra:
            for i in by_path.get(s.path, []):
                out[i] = s
        for err in batch.errors:
            for i in by_path.get(err.path, []):
                failed[i] = (err.path, err.reason, err.message)
        for i in lamost:
            if out[i] is None and i not in failed:
                failed[i] = (paths[i], "unreadable", "no result from the reader")
    for i, lay in enumerate(layouts):
        if i in lamost:
            continue
        reader = _reader_for(lay, readers)
        if reader is None:
            failed[i] = (paths[i], "no_reader", f"no reader named {lay!r} in the entry-point group "
                         "lamost_ostar.readers (is its plugin installed?)")
            continue
        try:
            out[i] = reader.read(paths[i])
        except ReadError as err:
            failed[i] = (paths[i], err.reason, err.message)
        except Exception as exc:  # noqa: BLE001 - a reader that breaks its protocol
            failed[i] = (paths[i], "reader_failed", f"{type(exc).__name__}: {exc}")
    return out, failed


class _Geometry:
    """Fixed pixel ranges of the plot panels on the common grid."""

    def __init__(self) -> None:
        from lamost_ostar.lines import LINES
        from lamost_ostar.preprocess import grid_wavelength

        self.wave = grid_wavelength().astype(np.float64)
        by = {ln.name: ln for ln in LINES}
        self.marks = [(float(by[n].vacuum), _SHORT[n], n.startswith("he")) for n in MARKED_LINES]
        lo, hi = np.searchsorted(self.wave, BLUE_RANGE)
        self.blue = (int(lo), int(hi))
        self.zoom = []
        for n in ZOOM_LINES:
            c = float(by[n].vacuum)
            a, b = np.searchsorted(self.wave, (c - ZOOM_HALF_WIDTH, c + ZOOM_HALF_WIDTH))
            self.zoom.append(dict(name=n, label=_SHORT[n], centre=c, lo=int(a), hi=int(b),
                                  window=by[n].vac(by[n].window)))

    def spec(self) -> dict:
        """Picklable description for the rendering processes."""
        return dict(wave=self.wave, marks=self.marks, blue=self.blue, zoom=self.zoom)


def _quantiles(values: np.ndarray, lo_q: float, hi_q: float) -> np.ndarray:
    """Per-row ``(q_lo, q_hi)`` of the finite values (NaN rows -> (1, 1)), vectorised."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = np.nanquantile(values, [lo_q, hi_q], axis=1).T
    return np.where(np.isfinite(q), q, 1.0)


def _scale_index(q: np.ndarray, scales: Sequence[tuple[float, float]]) -> np.ndarray:
    """Per row, the first of ``scales`` that holds ``[q_lo, q_hi]`` (else the last)."""
    lo = np.array([s[0] for s in scales])
    hi = np.array([s[1] for s in scales])
    fits = (lo[None, :] <= q[:, :1]) & (hi[None, :] >= q[:, 1:2])
    fits[:, -1] = True
    return np.argmax(fits, axis=1)


def _payloads(spectra: list[Any], rows: list[dict], geo: _Geometry, img_dir: str) -> list[dict]:
    """Plot data of one batch of readable spectra (vectorised over the batch)."""
    from lamost_ostar.preprocess import prepare

    prep = prepare(spectra)
    good = ~prep.mask
    flux = np.where(good, prep.flux, np.nan)
    top = _quantiles(flux, 0.5, 0.995)[:, 1]
    top = np.where(np.isfinite(top) & (top > 0), top, 1.0)
    main = (flux / top[:, None]).astype(np.float32)
    main_k = _scale_index(_quantiles(main, 0.01, 0.998), MAIN_SCALES)
    xn = np.where(good, prep.xn, np.nan).astype(np.float32)
    b0, b1 = geo.blue
    blue = xn[:, b0:b1]
    blue_k = _scale_index(_quantiles(blue, 0.01, 0.99), BLUE_SCALES)
    zooms = [xn[:, z["lo"]:z["hi"]] for z in geo.zoom]
    zoom_k = [_scale_index(_quantiles(z, 0.02, 0.98), ZOOM_SCALES) for z in zooms]
    out = []
    for k, row in enumerate(rows):
        out.append(dict(
            png=os.path.join(img_dir, row["png"]), title=row["title"],
            main=main[k], blue=blue[k], zooms=[z[k] for z in zooms],
            scales=[int(main_k[k]), int(blue_k[k])] + [int(z[k]) for z in zoom_k],
            meta=row["png_meta"], good_fraction=float(prep.good_fraction[k])))
    return out


# --------------------------------------------------------------------------- rendering (workers)
_FIG: dict[str, Any] = {}

#: y-ranges offered to each panel: the plot of a spectrum uses, per panel, the first
#: range that holds its robust data range (so the axes, their ticks and labels can be
#: drawn once per process and only the data drawn per spectrum)
MAIN_SCALES = ((-0.06, 1.18), (-0.1, 1.6), (-0.2, 2.4), (-0.4, 4.0))
BLUE_SCALES = ((0.5, 1.15), (0.3, 1.2), (0.0, 1.5), (-1.0, 3.0))
ZOOM_SCALES = ((0.85, 1.1), (0.7, 1.2), (0.5, 1.3), (0.0, 1.6), (-1.0, 3.0))
_N_SCALES = max(len(MAIN_SCALES), len(BLUE_SCALES), len(ZOOM_SCALES))


def _init_renderer(spec: dict) -> None:
    """Build the reusable figure of this process (called once per rendering process).

    Every static part (axes, ticks, labels, line marks) is drawn once for each
    y-range of :data:`MAIN_SCALES`/:data:`BLUE_SCALES`/:data:`ZOOM_SCALES`; a
    spectrum's plot copies, per panel, the pixels of the background of its range
    and draws only its data and titles on them (blitting, ~5x faster than a full
    draw).  If the panels' pixel regions overlap (they do not at this layout) every
    plot is drawn in full instead.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8,
                         "xtick.labelsize": 7, "ytick.labelsize": 7, "path.simplify": True})
    wave = spec["wave"]
    fig = plt.figure(figsize=(11.0, 7.2), dpi=90)
    gs = fig.add_gridspec(3, 6, height_ratios=[1.0, 1.15, 1.0], hspace=0.55, wspace=0.36,
                          left=0.055, right=0.985, top=0.9, bottom=0.065)
    ax_main = fig.add_subplot(gs[0, :])
    ax_blue = fig.add_subplot(gs[1, :])
    zoom_axes = [fig.add_subplot(gs[2, j]) for j in range(6)]
    dyn = dict(lw=0.55, color="#1f3b73", animated=True)
    (main_line,) = ax_main.plot(wave, np.zeros_like(wave), **dyn)
    ax_main.set_xlim(wave[0], wave[-1])
    ax_main.set_ylabel("flux / 99.5th percentile")
    ax_main.set_xlabel("vacuum wavelength [Å]", labelpad=1)
    b0, b1 = spec["blue"]
    (blue_line,) = ax_blue.plot(wave[b0:b1], np.ones(b1 - b0), **{**dyn, "lw": 0.7})
    ax_blue.set_xlim(wave[b0], wave[b1 - 1])
    ax_blue.axhline(1.0, color="0.6", lw=0.5, ls=":")
    ax_blue.set_ylabel("normalised flux")
    ax_blue.set_title("classification region, continuum-normalised", loc="left", y=1.0, pad=12)
    for w, label, he in spec["marks"]:
        colour = "#c0392b" if label.startswith("He II") else ("#d68910" if he else "#7f8c8d")
        ax_main.axvline(w, color=colour, lw=0.5, alpha=0.7, ls="--")
        ax_blue.axvline(w, color=colour, lw=0.6, alpha=0.8, ls="--")
        ax_blue.text(w, 1.0, label, transform=ax_blue.get_xaxis_transform(), ha="center",
                     va="bottom", fontsize=6.5, color=colour, clip_on=False)
    zoom_lines = []
    for ax, z in zip(zoom_axes, spec["zoom"]):
        x = wave[z["lo"]:z["hi"]]
        (ln,) = ax.plot(x, np.ones_like(x), drawstyle="steps-mid", **{**dyn, "lw": 0.8})
        ax.axvspan(*z["window"], color="#f5b7b1" if z["name"].startswith("heii") else "#fad7a0",
                   alpha=0.5, lw=0)
        ax.axvline(z["centre"], color="0.3", lw=0.5, ls="--")
        ax.axhline(1.0, color="0.6", lw=0.5, ls=":")
        ax.set_xlim(x[0], x[-1])
        c = round(z["centre"])
        ax.set_xticks([c - 20, c, c + 20])
        zoom_lines.append(ln)
        ax.set_title(z["label"], fontsize=8, y=1.0, pad=3)
    for ax in [ax_main, ax_blue, *zoom_axes]:
        ax.yaxis.set_major_locator(MaxNLocator(5))
    zoom_axes[0].set_ylabel("normalised flux")
    title = fig.text(0.055, 0.955, "", fontsize=9.5, ha="left", va="center", animated=True)
    panels = [(ax_main, MAIN_SCALES), (ax_blue, BLUE_SCALES)] + [(ax, ZOOM_SCALES) for ax in zoom_axes]

    # one background per scale index; each panel's pixel region over all its scales
    canvas = fig.canvas
    backgrounds = []
    boxes = [None] * len(panels)
    for k in range(_N_SCALES):
        for p, (ax, scales) in enumerate(panels):
            ax.set_ylim(*scales[min(k, len(scales) - 1)])
        canvas.draw()
        renderer = canvas.get_renderer()
        backgrounds.append(np.array(canvas.buffer_rgba(), copy=True))
        for p, (ax, _) in enumerate(panels):
            bb = ax.get_tightbbox(renderer)
            boxes[p] = bb if boxes[p] is None else type(bb).union([boxes[p], bb])
    height = backgrounds[0].shape[0]
    regions = []
    for bb in boxes:  # display (origin bottom-left) -> array rows/cols, 2 px margin
        c0, c1 = max(0, int(bb.x0) - 2), int(math.ceil(bb.x1)) + 2
        r0, r1 = max(0, height - int(math.ceil(bb.y1)) - 2), height - int(bb.y0) + 2
        regions.append((r0, r1, c0, c1))
    overlap = any(not (a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2])
                  for i, a in enumerate(regions) for b in regions[i + 1:])
    if overlap:
        for artist in [main_line, blue_line, *zoom_lines, title]:
            artist.set_animated(False)
    _FIG.update(fig=fig, panels=panels, lines=[main_line, blue_line, *zoom_lines],
                title=title, backgrounds=backgrounds,
                regions=regions, blit=not overlap)


def _render_one(item: dict) -> None:
    from PIL import Image, PngImagePlugin

    f = _FIG
    fig = f["fig"]
    canvas = fig.canvas
    ys = [item["main"], item["blue"], *item["zooms"]]
    scales = item["scales"]
    for (ax, options), ln, y, k in zip(f["panels"], f["lines"], ys, scales):
        ln.set_ydata(y)
        ax.set_ylim(*options[min(k, len(options) - 1)])
    f["title"].set_text(item["title"])
    if f["blit"]:
        buf = np.asarray(canvas.buffer_rgba())
        bgs = f["backgrounds"]
        buf[...] = bgs[0]
        for (r0, r1, c0, c1), k in zip(f["regions"], scales):
            if k:
                buf[r0:r1, c0:c1] = bgs[k][r0:r1, c0:c1]
        for (ax, _), ln in zip(f["panels"], f["lines"]):
            ax.draw_artist(ln)
        fig.draw_artist(f["title"])
    else:
        canvas.draw()
    w, h = canvas.get_width_height()
    img = Image.frombuffer("RGBA", (w, h), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
    img = img.quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    info = PngImagePlugin.PngInfo()
    for key, value in item["meta"].items():
        info.add_itxt(key, value)
    img.save(item["png"], format="PNG", compress_level=6, pnginfo=info)


def _render_batch(items: list[dict]) -> list[tuple[str, str | None]]:
    """Render a list of payloads; ``(png, error message or None)`` each (never raises)."""
    out = []
    for item in items:
        try:
            _render_one(item)
            out.append((item["png"], None))
        except Exception as exc:  # noqa: BLE001 - one bad plot must not stop the report
            out.append((item["png"], f"{type(exc).__name__}: {exc}"))
    return out


class _Renderer:
    """Rendering in ``workers`` processes (or in this one for ``workers=1``)."""

    def __init__(self, spec: dict, workers: int) -> None:
        self.futures: list[Any] = []
        self.results: list[tuple[str, str | None]] = []
        self.pool = None
        if workers > 1:
            import multiprocessing
            import sys
            import threading
            from concurrent.futures import ProcessPoolExecutor

            threaded = any(m in sys.modules for m in ("tensorflow", "torch", "jax"))
            if sys.platform.startswith("linux") and threading.active_count() == 1 and not threaded:
                # the figure and its backgrounds are built once, here, and inherited
                _init_renderer(spec)
                ctx, init, args = multiprocessing.get_context("fork"), None, ()
            else:
                ctx, init, args = multiprocessing.get_context("spawn"), _init_renderer, (spec,)
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init,
                                            initargs=args)
        else:
            _init_renderer(spec)

    def submit(self, items: list[dict]) -> None:
        for start in range(0, len(items), TASK):
            chunk = items[start:start + TASK]
            if self.pool is None:
                self.results.extend(_render_batch(chunk))
            else:
                self.futures.append(self.pool.submit(_render_batch, chunk))

    def finish(self) -> list[tuple[str, str | None]]:
        try:
            for fut in self.futures:
                self.results.extend(fut.result())
        finally:
            self.close()
        return self.results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------- summary plots
#: Rotation from Galactic to ICRS unit vectors (transpose of the ICRS -> Galactic matrix
#: of the Hipparcos catalogue; agrees with astropy to 0.05 arcsec).
_GAL_TO_ICRS = np.array([[-0.0548755604162154, -0.8734370902348850, -0.4838350155487132],
                         [0.4941094278755837, -0.4448296299600112, 0.7469822444972189],
                         [-0.8676661490190047, -0.1980763734312015, 0.4559837761750669]]).T


def _summary_plots(table, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = []
    cand = np.asarray(table["in_candidates"], dtype=bool) if len(table) else np.zeros(0, bool)
    p_o = _column_float(table, "p_o")
    post = _column_float(table, "posterior_o")
    with plt.rc_context({"font.size": 8}):
        fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.0), dpi=90, layout="constrained")
        bins = np.linspace(0.0, 1.0, 41)
        data = [p_o[cand & np.isfinite(p_o)], p_o[~cand & np.isfinite(p_o)]]
        axes[0].hist(data, bins=bins, stacked=True, color=["#c0392b", "#95a5a6"],
                     label=[f"candidates ({data[0].size})", f"non-candidates ({data[1].size})"])
        axes[0].set_xlabel("p(O) (training-balanced)")
        axes[0].set_ylabel("spectra")
        axes[0].legend(loc="upper left", frameon=False)
        axes[0].set_title("p(O) of the spectra in this report", loc="left")
        lp = np.log10(np.clip(post, 1e-8, 1.0))
        ok = np.isfinite(post)
        if ok.any():
            lb = np.linspace(min(-8.0, float(np.floor(lp[ok].min()))), 0.0, 41)
            axes[1].hist([lp[cand & ok], lp[~cand & ok]], bins=lb, stacked=True,
                         color=["#c0392b", "#95a5a6"])
        else:
            axes[1].text(0.5, 0.5, "no posterior p(O) stored\n(model without a decision)",
                         ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_xlabel("log10 posterior p(O) at the survey prior")
        axes[1].set_title("posterior p(O)", loc="left")
        fig.savefig(img_dir / "summary_p_o.png")
        plt.close(fig)
        names.append("summary_p_o.png")

        fig = plt.figure(figsize=(9.0, 4.6), dpi=90, layout="constrained")
        ax = fig.add_subplot(projection="mollweide")
        ra, dec = _column_float(table, "ra"), _column_float(table, "dec")

        def lon(r):
            return np.radians(180.0 - np.mod(r, 360.0))   # RA increasing to the left, 180 at centre

        # the Galactic plane and centre, for orientation (Galactic -> ICRS rotation)
        lgal = np.radians(np.linspace(0.0, 360.0, 721))
        e = _GAL_TO_ICRS @ np.stack([np.cos(lgal), np.sin(lgal), np.zeros_like(lgal)])
        x = lon(np.degrees(np.arctan2(e[1], e[0])))
        y = np.arcsin(np.clip(e[2], -1.0, 1.0))
        cut = np.flatnonzero(np.abs(np.diff(x)) > np.pi) + 1
        for xs, ys in zip(np.split(x, cut), np.split(y, cut)):
            ax.plot(xs, ys, color="#7f8c8d", lw=0.8, ls="--")
        gc = _GAL_TO_ICRS[:, 0]
        ax.plot(lon(np.degrees(np.arctan2(gc[1], gc[0]))), np.arcsin(gc[2]), marker="x", color="#7f8c8d")
        ok = np.isfinite(ra) & np.isfinite(dec)
        if (ok & ~cand).any():
            ax.scatter(lon(ra[ok & ~cand]), np.radians(dec[ok & ~cand]), s=8, facecolors="none",
                       edgecolors="#95a5a6", lw=0.6, label="non-candidates")
        if (ok & cand).any():
            sc = ax.scatter(lon(ra[ok & cand]), np.radians(dec[ok & cand]), s=10,
                            c=p_o[ok & cand], cmap="plasma", vmin=0.5, vmax=1.0, lw=0,
                            label="candidates")
            fig.colorbar(sc, ax=ax, shrink=0.6, label="p(O)")
        ticks = np.arange(-150, 181, 30)
        ax.set_xticks(np.radians(ticks))
        ax.set_xticklabels([f"{int((180 - t) / 15) % 24}h" for t in ticks], fontsize=7)
        ax.grid(True, lw=0.3, alpha=0.6)
        ax.set_title("positions (RA/Dec J2000, Mollweide; dashed: Galactic plane, x: Galactic centre)",
                     fontsize=8)
        if ok.any():
            ax.legend(loc="lower right", fontsize=7, frameon=False, markerscale=2.0)
        fig.savefig(img_dir / "summary_sky.png")
        plt.close(fig)
        names.append("summary_sky.png")
    return names


# --------------------------------------------------------------------------- HTML
_CSS = """
:root { --fg:#1b1f24; --muted:#5d6670; --line:#d8dde3; --cand:#c0392b; --non:#7f8c8d; --bg:#fff; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); margin: 0 auto; padding: 1rem 1.5rem 3rem;
       max-width: 1400px; font-size: 14px; line-height: 1.4; }
h1 { font-size: 1.45rem; margin: .2rem 0 .4rem; } h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem; }
.muted { color: var(--muted); } code { font-size: .92em; }
.badge { display:inline-block; padding:.05rem .45rem; border-radius:.6rem; font-size:.8rem;
         color:#fff; background:var(--cand); vertical-align: middle; }
.badge.non { background: var(--non); }
.cards { display:flex; flex-wrap:wrap; gap:.8rem; margin:.6rem 0; }
.card { border:1px solid var(--line); border-radius:.4rem; padding:.5rem .8rem; min-width:9rem; }
.card b { display:block; font-size:1.3rem; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); }
table { border-collapse: collapse; }
table.kv td, table.kv th { padding: .15rem .6rem .15rem 0; text-align: left; vertical-align: top; }
table.kv th { color: var(--muted); font-weight: normal; white-space: nowrap; }
table.grid td, table.grid th { border-bottom: 1px solid var(--line); padding: .2rem .45rem;
                               text-align: right; white-space: nowrap; }
table.grid td.l, table.grid th.l { text-align: left; }
.scroll { overflow: auto; max-width: 100%; max-height: 85vh; border: 1px solid var(--line); }
#cands { width: 100%; font-size: 13px; }
#cands thead th { position: sticky; top: 0; background: #f3f5f7; cursor: pointer; user-select: none; }
#cands thead th[aria-sort="ascending"]::after { content: " ▲"; }
#cands thead th[aria-sort="descending"]::after { content: " ▼"; }
#cands tbody tr:hover { background: #f7f9fb; }
#cands tr.non td { color: #4a5560; background: #fafafa; }
.controls { display:flex; flex-wrap:wrap; gap:1rem; align-items:center; margin:.5rem 0; }
.controls input[type=search] { width: 22rem; padding: .25rem .4rem; }
.cols { display:flex; flex-wrap:wrap; gap:2rem; align-items:flex-start; }
.bar { display:inline-block; height:.7rem; background:#5d6d7e; vertical-align:middle; }
.bar.o { background: var(--cand); }
nav a { margin-right: 1rem; }
.warn { color: #8a4b00; }
"""

_JS = r"""
// Sorting and filtering of the candidate table (no dependencies, works from file://).
(function () {
  "use strict";
  var table = document.getElementById("cands");
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var heads = table.tHead.rows[0].cells;
  function key(row, col, numeric) {
    var v = row.cells[col].getAttribute("data-v");
    if (v === null) { v = row.cells[col].textContent; }
    if (numeric) { var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v.toLowerCase();
  }
  function sortBy(col, dir) {
    var numeric = heads[col].getAttribute("data-type") === "num";
    var sign = dir === "ascending" ? 1 : -1;
    var decorated = rows.map(function (r, i) { return [key(r, col, numeric), i, r]; });
    decorated.sort(function (a, b) {
      if (a[0] === b[0]) { return a[1] - b[1]; }
      if (a[0] === null) { return 1; }          // empty values last in both directions
      if (b[0] === null) { return -1; }
      return (a[0] < b[0] ? -1 : 1) * sign;
    });
    var frag = document.createDocumentFragment();
    decorated.forEach(function (d) { frag.appendChild(d[2]); });
    tbody.appendChild(frag);
    rows = decorated.map(function (d) { return d[2]; });
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    heads[col].setAttribute("aria-sort", dir);
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var now = th.getAttribute("aria-sort");
      var numeric = th.getAttribute("data-type") === "num";
      sortBy(col, now ? (now === "descending" ? "ascending" : "descending")
                      : (numeric ? "descending" : "ascending"));
    });
  });
  var text = document.getElementById("filter");
  var kind = document.getElementById("kind");
  var minp = document.getElementById("minp");
  var pclass = document.getElementById("pclass");
  var shown = document.getElementById("shown");
  function applyFilter() {
    var q = (text.value || "").toLowerCase().trim();
    var k = kind.value, m = parseFloat(minp.value), pc = pclass.value, n = 0;
    rows.forEach(function (r) {
      var ok = (!q || r.textContent.toLowerCase().indexOf(q) >= 0)
        && (k === "all" || r.getAttribute("data-kind") === k)
        && (isNaN(m) || parseFloat(r.getAttribute("data-po")) >= m)
        && (pc === "" || r.getAttribute("data-pclass") === pc);
      r.style.display = ok ? "" : "none";
      if (ok) { n++; }
    });
    shown.textContent = n + " of " + rows.length + " shown";
  }
  [text, kind, minp, pclass].forEach(function (el) {
    el.addEventListener("input", applyFilter);
    el.addEventListener("change", applyFilter);
  });
  applyFilter();
  window.lamostReport = { sortBy: sortBy, applyFilter: applyFilter };
})();
"""


def _page(title: str, body: str, css: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><link rel=\"stylesheet\" href=\"{css}\"></head>"
            f"<body>\n{body}\n</body></html>\n")


_TABLE_COLUMNS = (
    # key, header, numeric, format
    ("rank", "#", True, "d"), ("name", "designation / obsid", False, None),
    ("kind", "decision", False, None), ("posterior_o", "posterior p(O)", True, ".3g"),
    ("p_o", "p(O)", True, ".4f"), ("heii_sigma", "He II σ", True, ".1f"),
    ("hei_sigma", "He I σ", True, ".1f"), ("predicted_class", "class", False, None),
    ("snr_g", "S/N g", True, ".1f"), ("pipeline_class", "pipeline class", False, None),
    ("pipeline_subclass", "subclass", False, None), ("ra", "RA", True, ".5f"),
    ("dec", "Dec", True, ".5f"), ("flags", "flags", False, None), ("plot", "plot", False, None),
)


def _flag_names(flags: Any) -> list[str]:
    from lamost_ostar.stage import decode_flags

    return decode_flags(int(flags)) if flags is not None else []


def _index_html(rows: list[dict], summary_imgs: list[str], bad: list[tuple[str, str, str]],
                meta: dict) -> str:
    n_c = int(sum(r["cand"] for r in rows))
    n_n = len(rows) - n_c
    pclass = Counter((r["pipeline_class"] or "(none)", r["cand"]) for r in rows)
    classes = sorted({k for k, _ in pclass}, key=lambda c: (-(pclass[(c, True)] + pclass[(c, False)]), c))
    maxc = max([pclass[(c, True)] + pclass[(c, False)] for c in classes] or [1])
    class_rows = "".join(
        f"<tr><td class=l>{_e(c)}</td><td>{pclass[(c, True)]}</td><td>{pclass[(c, False)]}</td>"
        f"<td class=l><span class='bar o' style='width:{120 * pclass[(c, True)] / maxc:.0f}px'></span>"
        f"<span class=bar style='width:{120 * pclass[(c, False)] / maxc:.0f}px'></span></td></tr>"
        for c in classes)
    more = (" <span class=warn>(the catalogue holds more candidates than the limit: "
            "raise --limit to see them)</span>") if meta["more_candidates"] else ""
    cards = (f"<div class=cards><div class=card><b>{n_c}</b>O candidates in this report{more}</div>"
             f"<div class=card><b>{n_n}</b>non-candidates compared</div>"
             f"<div class=card><b>{meta['catalogue_results']:,}</b>result rows in the catalogue</div>"
             f"<div class=card><b>{meta['catalogue_errors']:,}</b>error rows (unreadable at scan "
             "time: <code>lamost-ostar query --errors</code>)</div>"
             f"<div class=card><b>{len(bad)}</b>files not re-readable now</div></div>")
    head = "".join(f"<th{' class=l' if not num else ''} data-key='{k}'"
                   f"{' data-type=num' if num else ''}>{_e(h)}</th>"
                   for k, h, num, _ in _TABLE_COLUMNS)
    body_rows = []
    for r in rows:
        cells = []
        for k, _, num, spec in _TABLE_COLUMNS:
            v = r.get(k)
            if k == "name":
                cells.append(f"<td class=l><a href='c/{r['page']}'>{_e(r['name'])}</a></td>")
            elif k == "kind":
                cells.append("<td class=l>" + ("<span class=badge>candidate</span>" if r["cand"]
                                                else "<span class='badge non'>not</span>") + "</td>")
            elif k == "plot":
                cells.append("<td class=l>" + ("yes" if r["plotted"] else
                                                f"<span class=warn>{_e(r['bad_reason'])}</span>") + "</td>")
            elif k == "flags":
                cells.append(f"<td class=l>{_e(', '.join(_flag_names(v)))}</td>")
            elif num:
                dv = "" if v is None else repr(float(v))
                cells.append(f"<td data-v='{dv}'>{_e(_fmt(v, spec))}</td>")
            else:
                cells.append(f"<td class=l>{_e(_fmt(v, ''))}</td>")
        body_rows.append(f"<tr data-kind='{'cand' if r['cand'] else 'non'}' "
                         f"data-po='{'' if r['p_o'] is None else repr(float(r['p_o']))}' "
                         f"data-pclass='{_e(r['pipeline_class'] or '')}' class='{'' if r['cand'] else 'non'}'>"
                         + "".join(cells) + "</tr>")
    pc_options = "".join(f"<option value='{_e(c)}'>{_e(c)}</option>"
                         for c in sorted({r["pipeline_class"] for r in rows if r["pipeline_class"]}))
    bad_html = ("<p class=muted>Every file was re-read.</p>" if not bad else
                "<table class=grid><thead><tr><th class=l>#</th><th class=l>file</th><th class=l>reason"
                "</th><th class=l>message</th></tr></thead><tbody>" + "".join(
                    f"<tr><td class=l>{_e(rank)}</td><td class=l><code>{_e(p)}</code></td>"
                    f"<td class=l>{_e(reason)}</td><td class=l>{_e(msg)}</td></tr>"
                    for rank, p, reason, msg in bad) + "</tbody></table>")
    imgs = "".join(f"<img class=plot src='img/{_e(n)}' alt='{_e(n)}'> " for n in summary_imgs)
    body = f"""
<h1>O-star candidates: vetting report</h1>
<p class=muted>Catalogue <code>{_e(meta['db'])}</code> · model version(s) {_e(', '.join(meta['model_versions']) or '—')}
 · generated {_e(meta['created'])} by lamost_ostar {_e(meta['code_version'])} ·
 candidates = the model's decision (<code>is_candidate</code>), best first by posterior p(O), then p(O)</p>
{cards}
<h2>Summary</h2>
<div>{imgs}</div>
<h3>By LAMOST / survey pipeline class</h3>
<table class=grid><thead><tr><th class=l>pipeline class</th><th>candidates</th><th>non-candidates</th>
<th class=l></th></tr></thead><tbody>{class_rows or '<tr><td class=l colspan=4>no rows</td></tr>'}</tbody></table>
<h2>Spectra</h2>
<div class=controls>
 <input type=search id=filter placeholder="filter: designation, class, path, flag…" aria-label=filter>
 <label>show <select id=kind><option value=all>all</option><option value=cand>candidates</option>
  <option value=non>non-candidates</option></select></label>
 <label>p(O) ≥ <input id=minp type=number min=0 max=1 step=0.01 style="width:5rem"></label>
 <label>pipeline class <select id=pclass><option value="">any</option>{pc_options}</select></label>
 <span id=shown class=muted></span>
</div>
<p class=muted>Click a column header to sort (again to reverse).</p>
<div class=scroll><table id=cands class=grid><thead><tr>{head}</tr></thead><tbody>
{''.join(body_rows)}
</tbody></table></div>
<h2>Files that could not be re-read</h2>
{bad_html}
<script src="report.js"></script>
"""
    return _page("O-star candidates: vetting report", body, "report.css")


def _candidate_html(data: dict[str, list], i: int, r: dict, prev_page: str | None, next_page: str | None,
                    n_total: int) -> str:
    v = lambda name: _value(data, name, i)  # noqa: E731
    nav = "<nav><a href='../index.html'>↑ summary</a>" + \
        (f"<a href='{prev_page}'>← previous</a>" if prev_page else "") + \
        (f"<a href='{next_page}'>next →</a>" if next_page else "") + "</nav>"
    badge = ("<span class=badge>O candidate</span>" if r["cand"] else
             "<span class='badge non'>not a candidate (compared)</span>")
    if r["plotted"]:
        captions = " · ".join(f"{_e(label)}: EW {_e(text)}" for label, text in r["zoom_captions"])
        plot = (f"<img class=plot src='../img/{_e(r['png'])}' alt='spectrum of {_e(r['name'])}'>"
                f"<p class=muted>Zoom panels (box EW ± error, + = absorption): {captions}</p>")
    else:
        plot = (f"<p class=warn>No plot: the file could not be re-read ({_e(r['bad_reason'])}: "
                f"{_e(r['bad_message'])}).</p>")
    probs = [(c[2:].upper(), v(c)) for c in _CLASS_COLUMNS if v(c) is not None]
    prob_rows = "".join(
        f"<tr><td class=l>{_e(c)}</td><td>{p:.4f}</td><td class=l><span class='bar{' o' if c == 'O' else ''}'"
        f" style='width:{max(1.0, 200 * p):.0f}px'></span></td></tr>" for c, p in probs)
    ew_rows = []
    for n in _EW_LINES:
        ew, err = v(f"ew_{n}"), v(f"ew_{n}_err")
        z = (ew / err) if ew is not None and err else None
        label = {"hgamma": "Hγ", "hbeta": "Hβ"}.get(n, n.replace("heii_", "He II ").replace("hei_", "He I "))
        ew_rows.append(f"<tr><td class=l>{_e(label)}</td><td>{_fmt(ew, '.3f')}</td>"
                       f"<td>{_fmt(err, '.3f')}</td><td>{_fmt(z, '.1f')}</td></tr>")
    snr = " / ".join(_fmt(v(f"snr_{b}"), ".1f") for b in "gri")
    flags = _flag_names(v("flags"))

    def kv(pairs):
        return "<table class=kv>" + "".join(f"<tr><th>{_e(k)}</th><td>{val}</td></tr>"
                                             for k, val in pairs) + "</table>"

    decision = kv([
        ("decision", "O candidate" if r["cand"] else "not a candidate"),
        ("posterior p(O) (survey prior)", _e(_fmt(v("posterior_o"), ".4g"))),
        ("p(O) (balanced)", _e(_fmt(v("p_o"), ".4f"))),
        ("predicted class", _e(_fmt(v("predicted_class"), ""))),
        ("He II σ", _e(_fmt(v("heii_sigma"), ".2f"))),
        ("He II EW (mean)", f"{_e(_fmt(v('heii_ew'), '.3f'))} ± {_e(_fmt(v('heii_ew_err'), '.3f'))} Å"),
        ("He I σ", _e(_fmt(v("hei_sigma"), ".2f"))),
        ("He I EW (mean)", f"{_e(_fmt(v('hei_ew'), '.3f'))} ± {_e(_fmt(v('hei_ew_err'), '.3f'))} Å"),
        ("log W′ = log EW(4471)/EW(4541)", _e(_fmt(v("log_wprime"), ".2f"))),
        ("He II lines ≥ 2σ", _e(_fmt(v("n_heii_lines"), "d"))),
        ("He II detected (lines rule)", _e(_fmt(v("heii_detected"), ""))),
        ("He II 4686 in emission", _e(_fmt(v("heii_4686_emission"), ""))),
        ("cool-star metal veto", _e(_fmt(v("metal_veto"), ""))),
        ("quality flags", _e(", ".join(flags) or "none")),
        ("model version", f"<code>{_e(v('model_version'))}</code>"),
    ])
    observation = kv([
        ("designation", _e(_fmt(v("designation"), ""))),
        ("obsid", _e(_fmt(v("obsid"), "d"))),
        ("RA, Dec [deg]", f"{_e(_fmt(v('ra'), '.6f'))}, {_e(_fmt(v('dec'), '.6f'))}"),
        ("RA, Dec (hms dms)", _e(_sexagesimal(v("ra"), v("dec")))),
        ("S/N g / r / i", _e(snr)),
        ("pipeline class / subclass", f"{_e(_fmt(v('pipeline_class'), ''))} / "
                                      f"{_e(_fmt(v('pipeline_subclass'), ''))}"),
        ("data release, layout", f"{_e(_fmt(v('data_release'), ''))}, {_e(_fmt(v('layout'), ''))}"),
        ("LMJD, plan, spectrograph, fibre", " · ".join(_e(_fmt(v(k), "d" if k != "planid" else ""))
                                                     for k in ("lmjd", "planid", "spid", "fiberid"))),
        ("file", (f"<a href='{_e(Path(v('path')).as_uri())}'><code>{_e(v('path'))}</code></a>"
                  if v("path") and os.path.isabs(v("path")) else f"<code>{_e(v('path'))}</code>")),
        ("good pixels on the grid", _e(_fmt(r.get("good_fraction"), ".1%"))),
        ("scan, row id", f"{_e(_fmt(v('scan_id'), 'd'))}, {_e(_fmt(v('id'), 'd'))}"),
    ])
    body = f"""
{nav}
<h1>#{r['rank']} of {n_total} · {_e(r['name'])} {badge}</h1>
<p class=muted>posterior p(O) {_e(_fmt(v('posterior_o'), '.3g'))} · p(O) {_e(_fmt(v('p_o'), '.4f'))} ·
He II σ {_e(_fmt(v('heii_sigma'), '.1f'))} · S/N g {_e(_fmt(v('snr_g'), '.1f'))} ·
pipeline {_e(_fmt(v('pipeline_class'), ''))} {_e(_fmt(v('pipeline_subclass'), ''))}</p>
{plot}
<div class=cols>
<div><h2>Decision and He evidence</h2>{decision}</div>
<div><h2>Class probabilities</h2><table class=grid><tbody>{prob_rows or '<tr><td>—</td></tr>'}</tbody></table>
<h2>Line EWs (box, Å; + = absorption)</h2>
<table class=grid><thead><tr><th class=l>line</th><th>EW</th><th>error</th><th>EW/error</th></tr></thead>
<tbody>{''.join(ew_rows)}</tbody></table></div>
<div><h2>Observation</h2>{observation}</div>
</div>
{nav}
"""
    return _page(f"#{r['rank']} {r['name']}", body, "../report.css")


# --------------------------------------------------------------------------- output folder
def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ReportError(f"--out {out} exists and is not a folder")
        if not overwrite:
            raise ReportError(f"--out {out} exists (use --overwrite to replace it)")
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise ReportError(f"--out {out} is a folder that is not a lamost-ostar report (no "
                              f"{MARKER}); refusing to replace it")


def _install(tmp: Path, out: Path) -> None:
    """Put the finished report ``tmp`` at ``out`` (an old report there is replaced)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the build
def build_report(db: Any, out: str | os.PathLike, *, limit: int = DEFAULT_LIMIT,
                 include_non_candidates: int = 0, model_version: str | None = None,
                 overwrite: bool = False, workers: int = 2) -> ReportSummary:
    """Write the vetting report of a catalogue's O candidates to the folder ``out``.

    Parameters
    ----------
    db : str, path-like or URL
        The catalogue (SQLite path or URL, as :class:`lamost_ostar.catalogue.Catalogue`).
    out : str or path-like
        Report folder to create (its parent is created if needed).
    limit : int
        At most this many candidates (best first).
    include_non_candidates : int
        Also this many of the highest-p(O) rows that are not candidates, for comparison.
    model_version : str, optional
        Only rows of this model version.
    overwrite : bool
        Replace an existing report at ``out``.
    workers : int
        Rendering processes (1: render in this process).

    Returns
    -------
    ReportSummary

    Raises
    ------
    ReportError
        Bad arguments, an existing ``out`` without ``overwrite``, or a catalogue
        that cannot be opened or queried (one-line message).
    """
    import sqlalchemy.exc

    from lamost_ostar import code_version
    from lamost_ostar.catalogue import Catalogue, CatalogueError

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if int(limit) < 0:
        raise ReportError("--limit must be >= 0")
    if int(include_non_candidates) < 0:
        raise ReportError("--include-non-candidates must be >= 0")
    if int(workers) < 1:
        raise ReportError("--workers must be >= 1")
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)

    cat = None
    try:
        cat = Catalogue(db, create=False)
        table, more = select_rows(cat, limit=int(limit), include_non_candidates=int(include_non_candidates),
                                  model_version=model_version)
        counts = cat.counts(model_version)
        db_text = cat.url.render_as_string(hide_password=True)
        if model_version is not None and not counts.get("results"):
            raise ReportError(f"no result rows of model version {model_version!r} in the catalogue "
                              "(see lamost-ostar query --scans)")
    except CatalogueError as exc:
        raise ReportError(str(exc).splitlines()[0]) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        lines = str(orig).strip().splitlines()
        raise ReportError(f"database error: {lines[0] if lines else type(orig).__name__}") from None
    finally:
        if cat is not None:
            cat.close()
    timings["query"] = time.perf_counter() - t0

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise ReportError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    try:
        summary = _build(table, more, counts, db_text, tmp, int(workers), timings, t0, code_version())
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.out = out
    summary.seconds = time.perf_counter() - t0
    summary.timings["total"] = summary.seconds
    return summary


def _build(table, more: bool, counts: dict, db_text: str, tmp: Path, workers: int,
           timings: dict, t0: float, code_version: str) -> ReportSummary:
    n = len(table)
    data = _table_lists(table)
    (tmp / "img").mkdir()
    (tmp / "c").mkdir()
    width = max(4, len(str(n)))
    cand = np.asarray(table["in_candidates"], dtype=bool) if n else np.zeros(0, bool)
    rows: list[dict] = []
    for i in range(n):
        v = lambda name, i=i: _value(data, name, i)  # noqa: E731
        stem = f"{i + 1:0{width}d}"
        zt = []
        for name in ZOOM_LINES:
            ew, err = v(f"ew_{name}"), v(f"ew_{name}_err")
            label = _SHORT[name]
            zt.append((label, f"{ew:.2f} ± {err:.2f} Å" if ew is not None and err is not None else "—"))
        decision = "O candidate" if cand[i] else "not a candidate"
        title = (f"#{i + 1}   {_name(data, i)}   {decision}   posterior p(O) {_fmt(v('posterior_o'), '.3g')}"
                 f"   p(O) {_fmt(v('p_o'), '.4f')}   He II σ {_fmt(v('heii_sigma'), '.1f')}"
                 f"   S/N g {_fmt(v('snr_g'), '.1f')}")
        sub = (f"S/N g {_fmt(v('snr_g'), '.1f')}   pipeline {_fmt(v('pipeline_class'), '')} "
               f"{_fmt(v('pipeline_subclass'), '')}   predicted {_fmt(v('predicted_class'), '')}   "
               f"RA {_fmt(v('ra'), '.5f')}  Dec {_fmt(v('dec'), '.5f')}   {v('path')}")
        rows.append(dict(rank=i + 1, page=f"{stem}.html", png=f"{stem}.png", name=_name(data, i),
                         cand=bool(cand[i]), title=title, subtitle=sub, zoom_captions=zt,
                         png_meta={"Title": title, "Description": sub, "Source": str(v("path")),
                                   "Software": f"lamost_ostar {code_version} report"},
                         plotted=False, bad_reason=None, bad_message=None,
                         **{k: v(k) for k in ("posterior_o", "p_o", "heii_sigma", "hei_sigma",
                                              "predicted_class", "snr_g", "pipeline_class",
                                              "pipeline_subclass", "ra", "dec", "flags")}))

    # read + prepare in batches (vectorised), rendering overlapping in the worker processes
    geo = _Geometry()
    renderer = _Renderer(geo.spec(), workers) if n else None
    bad: list[tuple[int, str, str, str]] = []
    readers: dict = {}
    t_read = 0.0
    try:
        for start in range(0, n, BATCH):
            tb = time.perf_counter()
            idx = list(range(start, min(start + BATCH, n)))
            paths = [str(_value(data, "path", i)) for i in idx]
            layouts = [_value(data, "layout", i) for i in idx]
            spectra, failed = _read(paths, layouts, readers)
            for k, (p, reason, msg) in failed.items():
                i = idx[k]
                rows[i]["bad_reason"], rows[i]["bad_message"] = reason, msg
                bad.append((i + 1, p, reason, msg))
            ok = [k for k in range(len(idx)) if spectra[k] is not None]
            if ok:
                try:
                    items = _payloads([spectra[k] for k in ok], [rows[idx[k]] for k in ok], geo,
                                      str(tmp / "img"))
                except Exception:  # noqa: BLE001 - fall back to one at a time
                    items = []
                    for k in ok:
                        try:
                            items += _payloads([spectra[k]], [rows[idx[k]]], geo, str(tmp / "img"))
                        except Exception as exc1:  # noqa: BLE001
                            i = idx[k]
                            msg = f"cannot be put on the common grid ({type(exc1).__name__}: {exc1})"
                            rows[i]["bad_reason"], rows[i]["bad_message"] = "prepare_failed", msg
                            bad.append((i + 1, paths[k], "prepare_failed", msg))
                for item, k in zip(items, [k for k in ok if rows[idx[k]]["bad_reason"] is None]):
                    rows[idx[k]]["good_fraction"] = item["good_fraction"]
                t_read += time.perf_counter() - tb
                renderer.submit(items)
            else:
                t_read += time.perf_counter() - tb
        timings["read_prepare"] = t_read
        ts = time.perf_counter()
        summary_imgs = _summary_plots(table, tmp / "img")
        tw = time.perf_counter()
        timings["summary"] = tw - ts
        results = renderer.finish() if renderer is not None else []
        timings["render_wait"] = time.perf_counter() - tw
    finally:
        if renderer is not None:
            renderer.close()
    by_png = {os.path.basename(p): err for p, err in results}
    n_plotted = 0
    for i, r in enumerate(rows):
        if r["bad_reason"] is not None:
            continue
        err = by_png.get(r["png"], "not rendered")
        if err is None:
            r["plotted"] = True
            n_plotted += 1
        else:
            r["bad_reason"], r["bad_message"] = "plot_failed", err
            bad.append((i + 1, str(_value(data, "path", i)), "plot_failed", err))
    bad.sort()

    th = time.perf_counter()
    models = sorted({str(m) for m in table["model_version"] if m}) if n else []
    meta = dict(db=db_text, model_versions=models, created=datetime.now(timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"), code_version=code_version, more_candidates=more,
        catalogue_results=int(counts.get("results", 0)), catalogue_errors=int(counts.get("errors", 0)))
    (tmp / "report.css").write_text(_CSS, encoding="utf-8")
    (tmp / "report.js").write_text(_JS, encoding="utf-8")
    (tmp / "index.html").write_text(_index_html(rows, summary_imgs, bad, meta), encoding="utf-8")
    for i, r in enumerate(rows):
        prev_page = rows[i - 1]["page"] if i > 0 else None
        next_page = rows[i + 1]["page"] if i + 1 < n else None
        (tmp / "c" / r["page"]).write_text(_candidate_html(data, i, r, prev_page, next_page, n),
                                           encoding="utf-8")
    timings["html"] = time.perf_counter() - th
    n_c = int(cand.sum())
    bad_files = [(p, reason, msg) for _, p, reason, msg in bad]
    description = dict(generator="lamost_ostar report", code_version=code_version, created=meta["created"],
                       db=db_text, model_versions=models, n_rows=n, n_candidates=n_c,
                       n_non_candidates=n - n_c, more_candidates=more, n_plotted=n_plotted,
                       bad_files=[dict(path=p, reason=r_, message=m) for p, r_, m in bad_files],
                       timings={k: round(v, 3) for k, v in timings.items()}, workers=workers)
    (tmp / MARKER).write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")
    return ReportSummary(out=tmp, n_rows=n, n_candidates=n_c, n_non_candidates=n - n_c,
                         more_candidates=more, n_plotted=n_plotted, bad_files=bad_files,
                         timings=timings)
