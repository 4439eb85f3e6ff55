"""Robustness probes on a finished leave-one-star-out run: held-out stars with a feature no model saw.

The LOSO run (:mod:`lamost_ostar.loso`) judges each fold's models on stars
they never saw.  A probe re-realises those same held-out stars with one change
that none of the training spectra had, scores them with the run's saved fold
models, applies a fixed rule (the one a shipped model carries), and compares
the verdicts with the unchanged realisations (same random draws, so the
comparison is paired).

:func:`emission_probe` adds Balmer emission (:meth:`TemplateLibrary.with_balmer_emission`):
Be stars are about a sixth of the Galaxy's B stars (Zorec & Briot 1997) and
Oe stars several per cent of the O stars; their discs fill in the Balmer
absorption whose strength separates the two classes, and no template of the
libraries is an emission-line star.

Run it with ``scripts/loso_emission.py``.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import LabelledSpectra, _usable_for_training
from .loso import (_META_KEEP, _line_indices, _pct, _safe, _softmax, _table_inputs, _tables, _take_stars,
                   LosoConfig, ensemble_logits, load_oof, member_temperature, rule_candidates, saved_fold_model,
                   star_test_sets)

__all__ = ["emission_probe", "render_emission"]


def _run_config(folds_json: Mapping[str, Any]) -> LosoConfig:
    """The run's :class:`LosoConfig` (its profile and seed; the test-set sizes and degradations)."""
    c = folds_json["config"]
    cfg = LosoConfig.from_profile(str(c.get("profile", "full")), seed=int(c["seed"]))
    for key in ("o_per_star", "b_per_star", "x_per_star"):
        setattr(cfg, key, int(c.get(key, getattr(cfg, key))))
    return cfg


def _probe_spectra(test_lib, fold: int, cfg: LosoConfig, level: float) -> dict[str, LabelledSpectra]:
    """The O and B test realisations of a fold's held-out stars with ``level`` A of H-alpha emission."""
    # the same stream for every level: the realisations differ only by the emission
    rng = np.random.default_rng([cfg.seed, int(fold), 4242])
    return star_test_sets(test_lib.select(("O", "B")).with_balmer_emission(level), cfg, rng)


def emission_probe(run_dir: str | Path, rules: Mapping[str, Mapping[str, Any]], members: Sequence[str],
                   levels: Sequence[float] = (0.0, 5.0, 15.0, 40.0), class_veto: bool = True,
                   min_snr_g: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The held-out O and B stars of a LOSO run with Be/Oe-like Balmer emission, under a fixed rule.

    Parameters
    ----------
    run_dir : path
        A finished, analysed LOSO run made with ``save_models`` (``folds.json``,
        ``results.json``, ``oof_<model>.npz``, ``models/``).
    rules : mapping
        Model name -> operating point (e.g. a pooled run's ``models[m]["operating_point"]``);
        each model is a member or ``"ens-" + "-".join(members)``.
    members : sequence of str
        The saved fold models to score with (``cnn2dx``, ``lr2``).
    levels : sequence of float
        H-alpha emission equivalent widths [A]; the other Balmer lines follow
        :data:`~lamost_ostar.templates.BE_DECREMENT`.  Include 0 (the control).
    class_veto, min_snr_g
        The stage's own conditions, as in :func:`lamost_ostar.loso.apply_rule`.

    Returns
    -------
    dict
        ``levels`` -> model -> :func:`lamost_ostar.loso._tables` of the verdicts
        (O recall per star and star-averaged, B->O, B0-B1->O, by S/N and E(B-V))
        plus ``median_p_o`` of the O and B spectra; and the run, rule and sizes.
    """
    from .templates import load_templates

    run = Path(run_dir)
    fj = json.loads((run / "folds.json").read_text())
    res = json.loads((run / "results.json").read_text())["models"]
    cfg = _run_config(fj)
    oof = {m: load_oof(run / f"oof_{_safe(m)}.npz") for m in members}
    classes = [str(c) for c in oof[members[0]]["classes"]]
    member_t = {m: member_temperature(d) for m, d in oof.items()}
    ens = "ens-" + "-".join(members)
    lib = _usable_for_training(load_templates(), tuple(fj["config"]["recipe"]["classes"]))
    out: dict[str, Any] = {"run": str(run), "seed": cfg.seed, "members": list(members),
                           "levels": {}, "n": {}}
    recs: dict[float, list[dict[str, np.ndarray]]] = {float(lv): [] for lv in levels}
    for f in fj["folds"]:
        k = int(f["fold"])
        test_lib = _take_stars(lib, set(f["test_stars"]), True)
        predict = {m: saved_fold_model(run, m, k, len(classes)) for m in members}   # loaded once per fold
        for level in recs:
            sets = _probe_spectra(test_lib, k, cfg, level)
            log(f"  fold {k}, H-alpha emission {level:g} A: " + ", ".join(f"{n} {len(d)}" for n, d in sets.items()))
            for name, d in sets.items():
                if not len(d):
                    continue
                rec = {"fold": np.full(len(d), k), "set": np.full(len(d), name), "label": d.labels,
                       "star": d.star}
                rec.update({key: d.meta[key] for key in _META_KEEP if key in d.meta})
                rec.update({f"z_{m}": predict[m](d) for m in members})
                recs[level].append(rec)
    for level, level_recs in recs.items():
        data = {key: np.concatenate([r[key] for r in level_recs]) for key in level_recs[0]}
        logits = {m: data[f"z_{m}"] for m in members}
        logits[ens] = ensemble_logits([logits[m] for m in members], [member_t[m] for m in members])
        heii = data.get("heii_sigma", np.full(len(data["set"]), np.nan)).astype(float)
        index = _line_indices(data)
        o_col = classes.index("O")
        by_model = {}
        for m, op in rules.items():
            if m not in logits:
                continue
            probs = _softmax(logits[m], float(res[m]["temperature"]))
            cand = rule_candidates(op, classes, probs, heii, data, class_veto, min_snr_g)
            t = _tables(cand, *_table_inputs(data))
            sets = data["set"].astype(str)
            t["median_p_o"] = {name: float(np.median(probs[sets == name, o_col]))
                               for name in ("o", "b") if np.any(sets == name)}
            t["missed_o_snr_ge_10"] = _missed(cand, sets, data, probs, classes, op, index)
            by_model[m] = t
        out["levels"][f"{float(level):g}"] = by_model
        out["n"][f"{float(level):g}"] = {name: int(np.sum(data["set"] == name)) for name in ("o", "b")}
    return out


def _missed(cand, sets, data, probs, classes, op, index) -> dict[str, Any]:
    """O spectra at S/N >= 10 that are not candidates: how many, the hot-subdwarf veto's share, arg-max class."""
    from .models.decision import line_vetoed

    snr = data.get("snr_g", np.full(len(sets), np.nan)).astype(float)
    miss = (sets == "o") & (snr >= 10) & ~cand
    vetoed = np.asarray(line_vetoed(op.get("max_sdo_index"), index["sdo"], op.get("max_sdo_sigma"),
                                    index["sigma"]), bool)
    top = np.asarray(classes)[np.argmax(probs, axis=1)]
    return {"n": int(miss.sum()), "of": int(np.sum((sets == "o") & (snr >= 10))),
            "sdo_veto": int(np.sum(miss & vetoed)),
            "argmax": {str(c): int(np.sum(miss & (top == c))) for c in classes if np.any(miss & (top == c))}}


def render_emission(result: Mapping[str, Any], rule_from: str = "") -> str:
    """Markdown tables of :func:`emission_probe`'s result."""
    levels = list(result["levels"])
    models = list(result["levels"][levels[0]])
    lines = [f"# Balmer emission on held-out stars: seed {result['seed']} (`{result['run']}`)", "",
             f"Rule: {rule_from or 'given'}; the stage's S/N floor and class veto in force. Spectra per level: "
             + ", ".join(f"{k} Å: {v['o']} O, {v['b']} B" for k, v in result["n"].items()) + ".", ""]
    for m in models:
        lines += [f"## {m}", "", "| Hα emission EW | O recall, S/N ≥ 10 (star-averaged) | O recall, all | B→O | "
                  "B0–B1→O | median p(O), O | median p(O), B |", "|---|---|---|---|---|---|---|"]
        for lv in levels:
            t = result["levels"][lv][m]
            lines.append(f"| {lv} Å | {_pct(t['o_recall_star_averaged_snr_ge_10'])} | "
                         f"{_pct(t['o_recall_star_averaged'])} | {_pct(t['b_to_o'])} | {_pct(t['b0_b1_to_o'])} | "
                         f"{t['median_p_o'].get('o', float('nan')):.3f} | {t['median_p_o'].get('b', float('nan')):.3f} |")
        lines += ["", "O spectra at S/N ≥ 10 not called O (of all), how many the hot-subdwarf veto stopped, and "
                  "their arg-max class: " + "; ".join(
                      f"{lv} Å: {t['n']} of {t['of']}, veto {t['sdo_veto']}, "
                      + ", ".join(f"{c} {k}" for c, k in sorted(t["argmax"].items(), key=lambda x: -x[1]))
                      for lv, t in ((lv, result["levels"][lv][m]["missed_o_snr_ge_10"]) for lv in levels))]
        stars = sorted(result["levels"][levels[0]][m]["o_recall_per_star"])
        lines += ["", "O recall per unit, S/N ≥ 10: " + "; ".join(
            f"{s} " + " / ".join(_pct(result["levels"][lv][m]["o_recall_per_star"][s]["snr_ge_10"]) for lv in levels)
            for s in stars) + f" (levels {', '.join(levels)} Å)", ""]
    return "\n".join(lines) + "\n"
