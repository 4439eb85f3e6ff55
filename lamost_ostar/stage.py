"""The O-star stage: a batch of files or spectra -> one result per spectrum.

This is the plugin API of :mod:`lamost_ostar`.  A *stage* is any object with

* ``process(items) -> list[result]``: ``items`` is a sequence of file paths
  and/or :class:`lamost_ostar.io.Spectrum` records; exactly one result per item
  comes back, **in input order**; a bad item gives a result with ``ok=False``
  and an ``error_reason``/``error_message``, never an exception;
* ``model_version``: a string naming what produced the results (used to skip
  files already done when a scan is resumed; a stage without a model uses its
  ``version``);
* ``name``: the stage's name (its entry point name; the sinks' table name);
* ``version``: the version of the stage's code and outputs;
* ``outputs``: a tuple of :class:`OutputField` (name, type, unit, description)
  declaring what each result holds besides the shared fields of
  :class:`SpectrumResult`: the sinks (SQL catalogue, Parquet) store one table per
  stage built from this declaration, so a plugin's results are kept without any
  change to the core;
* optionally ``output_values(result) -> mapping`` (output name -> value) when
  the values are not simply the result's attributes of those names.

A scan running several stages reads each file once and hands every stage the
same :class:`lamost_ostar.io.Spectrum` records.

Stages are registered as entry points in the group ``lamost_ostar.stages``
(this package registers ``ostar`` -> :class:`OStarStage`) and loaded by name
with :func:`load_stage`, so another pipeline, or :mod:`lamost_ostar.scan`, can
use a stage without importing it.  The core never imports plugins.

Quality flags (:attr:`StageResult.flags`) are bits; test them with ``&``:

=====================  =====  ===============================================
flag                   value  meaning
=====================  =====  ===============================================
``FLAG_LOW_SNR``       1      S/N in g below :data:`LOW_SNR_G`
``FLAG_NO_SNR``        2      no S/N in g in the header
``FLAG_MASKED``        4      fewer than :data:`MIN_GOOD_FRACTION` of the grid
                              pixels are good (rest interpolated or missing)
``FLAG_EDGE``          8      coverage misses more than :data:`EDGE_MAX_MISSING`
                              pixels at the blue or red end of the grid
``FLAG_NOT_STAR``      16     LAMOST pipeline CLASS is given and is not STAR
``FLAG_LOW_CONFIDENCE``32     highest class probability below
                              :data:`MIN_CONFIDENCE`
``FLAG_NO_HE_LINES``   64     no He II line could be measured (window or side
                              bands masked): the He II evidence is missing
``FLAG_HEII_EMISSION`` 128    He II 4686 in emission (Of supergiants, Wolf-Rayet
                              and central stars)
``FLAG_CLASS_VETO``    256    the candidate rule said O, but the LAMOST pipeline
                              CLASS is GALAXY or QSO (:data:`VETO_CLASSES`): not
                              a candidate (``OStarStage(class_veto=True)``)
``FLAG_SNR_FLOOR``     512    the candidate rule said O, but S/N(g) is below the
                              floor (:data:`MIN_SNR_G`, 3): not a candidate
                              (``OStarStage(min_snr_g=...)``)
=====================  =====  ===============================================

The O-candidate decision (``is_candidate``) is the model card's rule
(:class:`lamost_ostar.models.decision.Decision`): the posterior p(O) at the
survey prior (``posterior_o``; ``p_o`` is the network's balanced probability)
and the He II absorption measured on the spectrum (``heii_sigma``,
:mod:`lamost_ostar.lines`).  Every result carries that evidence
(:attr:`StageResult.evidence`: EWs and errors of the He II, He I and Balmer
lines, the combined He II / He I significances, log W'), so an astronomer can
see why a spectrum is, or is not, a candidate.  A spectrum with S/N(g) below
:data:`MIN_SNR_G` (3) is never a candidate either (:data:`FLAG_SNR_FLOOR` where
the rule alone would have kept it): it is noise to the network and to the
He II measurement alike.  A spectrum the LAMOST pipeline
calls a galaxy or a quasar (CLASS in :data:`VETO_CLASSES`) is never a candidate
unless the stage is built with ``class_veto=False``; a spectrum the rule alone
would have kept carries :data:`FLAG_CLASS_VETO`, so the veto is visible.  Why:
a LAMOST release holds about a thousand galaxies and quasars for every O star,
the models are trained on stars only, and two of the nine real LAMOST galaxies
were O by a held-out rule (reports/loso/run7/README.md).  CLASS ``Unknown`` and a missing
CLASS are not vetoed (faint or odd stars get them).

Examples
--------
>>> from lamost_ostar.stage import load_stage          # doctest: +SKIP
>>> stage = load_stage("ostar", device="cpu")          # doctest: +SKIP
>>> [r.p_o for r in stage.process(["spec-55859-F5902_sp01-001.fits.gz"])]  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import re
import threading
import os
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields as _dc_fields
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lamost_ostar import entrypoints as _eps
from lamost_ostar import lines as _lines
from lamost_ostar.io import DEFAULT_ENGINE, ENGINES, ReadError, Spectrum, read_spectra
from lamost_ostar.models.decision import (MIN_SNR_G, VETO_CLASSES, Decision, below_snr_floor,
                                          class_vetoed)
from lamost_ostar.preprocess import PreparedBatch, model_input, prepare

__all__ = [
    "OutputField",
    "OUTPUT_TYPES",
    "METADATA_FIELDS",
    "PROVENANCE_COLUMNS",
    "RESERVED_NAMES",
    "OSTAR_CLASSES",
    "OSTAR_OUTPUTS",
    "StageSpec",
    "stage_spec",
    "coerce",
    "outputs_from_dataclass",
    "SpectrumResult",
    "read_items",
    "accepts_prepared",
    "ENTRY_POINT_GROUP",
    "FLAG_LOW_SNR",
    "FLAG_NO_SNR",
    "FLAG_MASKED",
    "FLAG_EDGE",
    "FLAG_NOT_STAR",
    "FLAG_LOW_CONFIDENCE",
    "FLAG_NO_HE_LINES",
    "FLAG_HEII_EMISSION",
    "FLAG_CLASS_VETO",
    "FLAG_SNR_FLOOR",
    "VETO_CLASSES",
    "class_vetoed",
    "MIN_SNR_G",
    "below_snr_floor",
    "FLAG_NAMES",
    "EVIDENCE_FIELDS",
    "evidence_records",
    "LOW_SNR_G",
    "MIN_GOOD_FRACTION",
    "EDGE_MAX_MISSING",
    "MIN_CONFIDENCE",
    "DEVICES",
    "Stage",
    "StageResult",
    "OStarStage",
    "decode_flags",
    "spectrum_metadata",
    "quality_flags",
    "resolve_device",
    "available_stages",
    "load_stage",
]

#: Entry point group for stages.
ENTRY_POINT_GROUP = "lamost_ostar.stages"

#: S/N in g below this value.
FLAG_LOW_SNR = 1 << 0
#: No g-band S/N in the header.
FLAG_NO_SNR = 1 << 1
#: Too many grid pixels interpolated over bad pixels or outside the coverage.
FLAG_MASKED = 1 << 2
#: The spectrum does not reach one end of the grid.
FLAG_EDGE = 1 << 3
#: The LAMOST pipeline class is known and is not STAR.
FLAG_NOT_STAR = 1 << 4
#: The model's highest class probability is low.
FLAG_LOW_CONFIDENCE = 1 << 5
#: No He II line could be measured: the He II evidence is missing.
FLAG_NO_HE_LINES = 1 << 6
#: He II 4686 is in emission.
FLAG_HEII_EMISSION = 1 << 7
#: The rule said O, but the pipeline CLASS is in :data:`VETO_CLASSES`: not a candidate.
FLAG_CLASS_VETO = 1 << 8
#: The rule said O, but S/N(g) is below the floor (:data:`MIN_SNR_G`): not a candidate.
FLAG_SNR_FLOOR = 1 << 9


#: flag bit -> name
FLAG_NAMES: dict[int, str] = {
    FLAG_LOW_SNR: "low_snr",
    FLAG_NO_SNR: "no_snr",
    FLAG_MASKED: "masked",
    FLAG_EDGE: "edge",
    FLAG_NOT_STAR: "not_star",
    FLAG_LOW_CONFIDENCE: "low_confidence",
    FLAG_NO_HE_LINES: "no_he_lines",
    FLAG_HEII_EMISSION: "heii_emission",
    FLAG_CLASS_VETO: "class_veto",
    FLAG_SNR_FLOOR: "snr_floor",
}

#: Lines whose box EW and error every result stores (``ew_<line>``, ``ew_<line>_err``).
EVIDENCE_LINES: tuple[str, ...] = ("heii_4200", "heii_4541", "heii_4686", "heii_5411", "hei_4026",
                                   "hei_4471", "hei_4922", "hdelta", "hgamma", "hbeta")
#: Combined evidence every result stores (see :class:`lamost_ostar.lines.HeEvidence`).
EVIDENCE_COMBINED: tuple[str, ...] = ("heii_ew", "heii_ew_err", "heii_sigma", "hei_ew", "hei_ew_err",
                                      "hei_sigma", "log_wprime", "n_heii_lines", "heii_detected",
                                      "heii_4686_emission", "metal_veto", "sdo_index",
                                      "sdo_sigma")
#: Keys of :attr:`StageResult.evidence`, in order.
EVIDENCE_FIELDS: tuple[str, ...] = EVIDENCE_COMBINED + tuple(
    f"ew_{n}{e}" for n in EVIDENCE_LINES for e in ("", "_err"))


def evidence_records(m: "_lines.LineMeasurements") -> list[dict[str, Any]]:
    """Per-spectrum evidence dicts (keys :data:`EVIDENCE_FIELDS`, None for NaN) of a measurement.

    Converted column by column (``tolist``), not value by value: bool and integer
    columns give Python bools and ints, float columns Python floats with None for
    a non-finite value.
    """
    cols: list[list[Any]] = []
    for key in EVIDENCE_FIELDS:
        if key in EVIDENCE_COMBINED:
            a = np.asarray(getattr(m, key))
        else:
            ew, err = m.ew_of(key[3:-4] if key.endswith("_err") else key[3:])
            a = np.asarray(err if key.endswith("_err") else ew)
        if a.dtype.kind in "biu":
            cols.append(a.tolist())
            continue
        a = a.astype(np.float64)
        ok = np.isfinite(a)
        vals = a.tolist()
        if not ok.all():
            vals = [v if f else None for v, f in zip(vals, ok.tolist())]
        cols.append(vals)
    return [dict(zip(EVIDENCE_FIELDS, row)) for row in zip(*cols)]

#: g-band S/N threshold of ``FLAG_LOW_SNR``.
LOW_SNR_G = 10.0
#: Minimum fraction of good grid pixels (else ``FLAG_MASKED``).
MIN_GOOD_FRACTION = 0.8
#: Maximum number of missing grid pixels at either end (else ``FLAG_EDGE``);
#: 100 pixels of 1e-4 dex are ~86 A at the blue end.  DR2+ spectra start at
#: 3699.9 A, 12 pixels after the grid start, and are not flagged.
EDGE_MAX_MISSING = 100
#: Highest class probability below which ``FLAG_LOW_CONFIDENCE`` is set.
MIN_CONFIDENCE = 0.5

#: Accepted values of the ``device`` argument.
DEVICES = ("auto", "cpu", "gpu")


# --------------------------------------------------------------------------
# output declarations (what a stage writes; the sinks build one table per stage from it)
# --------------------------------------------------------------------------
#: Types of an :class:`OutputField` (SQL: Float / BigInteger / Boolean / Text / JSON;
#: Parquet: float64 / int64 / bool / string / string holding JSON).
OUTPUT_TYPES: tuple[str, ...] = ("float", "int", "bool", "str", "json")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,59}$")


@dataclass(frozen=True)
class OutputField:
    """One declared output of a stage: a column of the stage's result table.

    Parameters
    ----------
    name : str
        Column name: lower-case letters, digits and ``_``, starting with a letter,
        at most 60 characters, not one of :data:`RESERVED_NAMES`.
    type : {"float", "int", "bool", "str", "json"}
        Value type; values are coerced to it when stored (NaN/inf floats and
        unparsable values become NULL).
    unit : str, optional
        Physical unit (astropy string, e.g. ``"Angstrom"``, ``"deg"``).
    description : str
        One line, shown in exports (FITS/VOTable column descriptions).
    index : bool
        Ask SQL sinks for an index on this column (selections on it are fast).
    summary : bool
        For a bool output: the scan summary prints how many results were True.
    """

    name: str
    type: str
    unit: str | None = None
    description: str = ""
    index: bool = False
    summary: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"output name {self.name!r} must match {_NAME_RE.pattern}")
        if self.name in RESERVED_NAMES:
            raise ValueError(f"output name {self.name!r} is reserved (shared or provenance column)")
        if self.type not in OUTPUT_TYPES:
            raise ValueError(f"output {self.name!r}: type must be one of {OUTPUT_TYPES}, "
                             f"got {self.type!r}")
        if self.summary and self.type != "bool":
            raise ValueError(f"output {self.name!r}: only bool outputs can be summary counts")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored with the catalogue's and the Parquet dataset's stage list)."""
        return {"name": self.name, "type": self.type, "unit": self.unit,
                "description": self.description, "index": self.index, "summary": self.summary}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "OutputField") -> "OutputField":
        """Inverse of :meth:`to_dict` (an OutputField passes through)."""
        if isinstance(d, OutputField):
            return d
        return cls(name=d["name"], type=d["type"], unit=d.get("unit"),
                   description=d.get("description") or "", index=bool(d.get("index", False)),
                   summary=bool(d.get("summary", False)))


#: Shared header metadata stored with every stage's results (the fields of
#: :class:`SpectrumResult` after ``error_message``): (name, type, unit, description).
_METADATA = (
    ("obsid", "int", None, "survey observation id (LAMOST OBSID)"),
    ("designation", "str", None, "designation (Jhhmmss.ss+ddmmss.s)"),
    ("ra", "float", "deg", "right ascension (J2000)"),
    ("dec", "float", "deg", "declination (J2000)"),
    ("lmjd", "int", None, "local modified Julian day"),
    ("planid", "str", None, "plan id"),
    ("spid", "int", None, "spectrograph id"),
    ("fiberid", "int", None, "fibre id"),
    ("snr_g", "float", None, "pipeline S/N in g"),
    ("snr_r", "float", None, "pipeline S/N in r"),
    ("snr_i", "float", None, "pipeline S/N in i"),
    ("pipeline_class", "str", None, "survey pipeline CLASS"),
    ("pipeline_subclass", "str", None, "survey pipeline SUBCLASS"),
    ("data_release", "str", None, "data release (DATA_V)"),
    ("layout", "str", None, "file layout (image, dr1, coadd, or the reader's own)"),
)
#: Provenance columns of every stage's table, written by the sink:
#: file path, scan id, model version (the resume key), stage version, code version, time.
PROVENANCE_COLUMNS: tuple[str, ...] = ("path", "scan_id", "model_version", "stage_version",
                                       "code_version", "created")
#: Names an output cannot take.
RESERVED_NAMES: frozenset[str] = frozenset(
    {"id", "ok", "error_reason", "error_message", "stage", "dist"}
    | set(PROVENANCE_COLUMNS) | {m[0] for m in _METADATA})
class _SharedField(OutputField):
    """A shared (metadata) column: a reserved name, declared by the core itself."""

    def __post_init__(self) -> None:
        pass


#: The shared header metadata columns, as OutputFields (types for the sinks).
METADATA_FIELDS: tuple[OutputField, ...] = tuple(_SharedField(n, t, u, d) for n, t, u, d in _METADATA)


def _to_float(v: Any) -> float | None:
    if v is None:
        return None
    if type(v) is float:
        return v if math.isfinite(v) else None
    return coerce(v, "float")


def _to_int(v: Any) -> int | None:
    if v is None:
        return None
    if type(v) is int:
        return v
    return coerce(v, "int")


def _to_bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


def _to_str(v: Any) -> str | None:
    if v is None:
        return None
    if type(v) is str:
        v = v.strip()
        return v or None
    return coerce(v, "str")


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _to_json(v: Any) -> Any:
    if v is None:
        return None
    if type(v) is dict and all(type(k) is str and type(x) in _JSON_SCALARS for k, x in v.items()):
        return dict(v)  # a flat mapping of plain scalars: what the JSON round trip would give
    return coerce(v, "json")


#: output type -> converter (fast paths for values that already have the type)
_CONVERT = {"float": _to_float, "int": _to_int, "bool": _to_bool, "str": _to_str, "json": _to_json}


def _float_column(values: list[Any]) -> list[Any]:
    # v - v == 0.0 is False for NaN and +-inf: one comparison per value, no call
    if all(type(v) is float or v is None for v in values):
        return [v if v is not None and v - v == 0.0 else None for v in values]
    return [_to_float(v) for v in values]


def _int_column(values: list[Any]) -> list[Any]:
    if all(type(v) is int or v is None for v in values):
        return values
    return [_to_int(v) for v in values]


def _bool_column(values: list[Any]) -> list[Any]:
    return [None if v is None else bool(v) for v in values]


def _column_of(convert: Callable[[Any], Any]) -> Callable[[list[Any]], list[Any]]:
    return lambda values: [convert(v) for v in values]


def _columns(rows: Sequence[Any], names: Sequence[str]) -> list[list[Any]]:
    """``[[row's name for row in rows] for name in names]`` for objects or mappings."""
    is_map = [_is_mapping_type(type(r)) for r in rows]
    if all(is_map):
        return [[r.get(n) for r in rows] for n in names]
    if not any(is_map):
        return [[getattr(r, n, None) for r in rows] for n in names]
    return [[r.get(n) if m else getattr(r, n, None) for r, m in zip(rows, is_map)] for n in names]


#: output type -> converter of a whole column (the same values as ``_CONVERT`` value by value)
_CONVERT_COLUMN = {"float": _float_column, "int": _int_column, "bool": _bool_column,
                   "str": _column_of(_to_str), "json": _column_of(_to_json)}


def coerce(value: Any, kind: str) -> Any:
    """``value`` as an output of type ``kind`` (None for missing, NaN or unparsable values)."""
    if value is None:
        return None
    try:
        if kind == "float":
            f = float(value)
            return f if math.isfinite(f) else None
        if kind == "int":
            if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
                return None
            return int(value)
        if kind == "bool":
            return bool(value)
        if kind == "str":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            text = str(value).strip()
            return text or None
        if kind == "json":
            return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError, OverflowError):
        return None
    raise ValueError(f"unknown output type {kind!r}")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


@functools.lru_cache(maxsize=256)
def _is_mapping_type(cls: type) -> bool:
    """``issubclass(cls, Mapping)``, cached (the ABC check costs more than a dict lookup)."""
    return issubclass(cls, Mapping)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if _is_mapping_type(type(obj)):
        return obj.get(name, default)
    return getattr(obj, name, default)


_ANNOTATION_TYPES = {"float": "float", "int": "int", "bool": "bool", "str": "str",
                     "dict": "json", "list": "json"}


def outputs_from_dataclass(cls: type, *, units: Mapping[str, str] | None = None,
                           descriptions: Mapping[str, str] | None = None,
                           index: Sequence[str] = (), summary: Sequence[str] = (),
                           exclude: Sequence[str] = ("model_version",)) -> tuple[OutputField, ...]:
    """Declare a result dataclass's own fields (those beyond :class:`SpectrumResult`) as outputs.

    The type comes from each field's annotation (``float | None`` -> ``"float"``,
    ``dict[...]`` -> ``"json"``); a plugin writer calls this once on its result
    record instead of listing every field by hand.
    """
    base = {f.name for f in _dc_fields(SpectrumResult)}
    units = dict(units or {})
    descriptions = dict(descriptions or {})
    out = []
    for f in _dc_fields(cls):
        if f.name in base or f.name in exclude:
            continue
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        head = ann.replace(" ", "").split("|")[0].split("[")[0]
        kind = _ANNOTATION_TYPES.get(head)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: cannot tell an output type from {ann!r}")
        out.append(OutputField(f.name, kind, units.get(f.name), descriptions.get(f.name, ""),
                               index=f.name in index, summary=f.name in summary))
    return tuple(out)


@dataclass
class StageSpec:
    """What a sink needs to know about a stage: name, versions, declared outputs.

    Built from a stage object, its class, or the JSON form a sink stored
    (:meth:`to_dict`); see :func:`stage_spec`.
    """

    name: str
    version: str
    outputs: tuple[OutputField, ...] = ()
    model_version: str | None = None
    values: Callable[[Any], Mapping[str, Any]] | None = field(default=None, repr=False,
                                                                compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"stage name {self.name!r} must match {_NAME_RE.pattern}")
        self.outputs = tuple(OutputField.from_dict(o) for o in self.outputs)
        seen = set()
        for o in self.outputs:
            if o.name in seen:
                raise ValueError(f"stage {self.name!r} declares output {o.name!r} twice")
            seen.add(o.name)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the declared outputs, in order."""
        return tuple(o.name for o in self.outputs)

    @property
    def has_candidates(self) -> bool:
        """True when the stage makes an O-candidate decision (``is_candidate`` or ``p_o``)."""
        return bool({"is_candidate", "p_o"} & set(self.output_names))

    def output_values(self, result: Any) -> dict[str, Any]:
        """The declared outputs of one result, coerced to their types."""
        conv = self.__dict__.get("_conv")
        if conv is None:
            conv = self.__dict__["_conv"] = tuple((o.name, _CONVERT[o.type]) for o in self.outputs)
        if self.values is not None:
            raw = self.values(result)
            return {name: f(raw.get(name)) for name, f in conv}
        if isinstance(result, Mapping):
            return {name: f(result.get(name)) for name, f in conv}
        return {name: f(getattr(result, name, None)) for name, f in conv}

    def metadata_values(self, result: Any) -> dict[str, Any]:
        """The shared header metadata of one result, coerced."""
        if isinstance(result, Mapping):
            return {name: f(result.get(name)) for name, f in _META_CONV}
        return {name: f(getattr(result, name, None)) for name, f in _META_CONV}

    def value_columns(self, results: Sequence[Any]) -> dict[str, list[Any]]:
        """The shared metadata and the declared outputs of many results, column by column.

        The same values as :meth:`metadata_values` and :meth:`output_values`
        called on each result (an output named like a metadata field wins, as
        in ``row.update(metadata); row.update(outputs)``), built one column at
        a time: what a sink writing a batch of rows uses.

        Parameters
        ----------
        results : sequence
            The stage's results (objects or mappings).

        Returns
        -------
        dict
            Column name -> list of coerced values, one per result, in order.
        """
        cols = {m.name: _CONVERT_COLUMN[m.type](col) for m, col in
                zip(METADATA_FIELDS, _columns(results, [m.name for m in METADATA_FIELDS]))}
        raw = [self.values(r) for r in results] if self.values is not None else results
        for o, col in zip(self.outputs, _columns(raw, self.output_names)):
            cols[o.name] = _CONVERT_COLUMN[o.type](col)
        return cols

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (no ``values`` hook)."""
        return {"name": self.name, "version": self.version, "model_version": self.model_version,
                "outputs": [o.to_dict() for o in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        """Inverse of :meth:`to_dict`."""
        return cls(name=d["name"], version=d.get("version") or "", model_version=d.get("model_version"),
                   outputs=tuple(OutputField.from_dict(o) for o in d.get("outputs") or ()))


_META_CONV = tuple((m.name, _CONVERT[m.type]) for m in METADATA_FIELDS)


def stage_spec(stage: Any, name: str | None = None) -> StageSpec:
    """The :class:`StageSpec` of a stage instance or class (a StageSpec passes through).

    A stage written before outputs were declared (only ``process`` and
    ``model_version``) gets ``name`` (its entry point name), its model version
    as version and no outputs: the sinks then store the shared fields only.
    """
    if isinstance(stage, StageSpec):
        return stage
    if isinstance(stage, Mapping):
        return StageSpec.from_dict(stage)
    nm = getattr(stage, "name", None)
    nm = nm if isinstance(nm, str) and nm else name
    if nm is None:
        raise ValueError(f"stage {stage!r} has no name")
    mv = getattr(stage, "model_version", None)
    mv = mv if isinstance(mv, str) else None
    version = getattr(stage, "version", None)
    version = version if isinstance(version, str) and version else (mv or "unversioned")
    hook = getattr(stage, "output_values", None)
    return StageSpec(name=nm, version=version, outputs=tuple(getattr(stage, "outputs", ()) or ()),
                     model_version=mv, values=hook if callable(hook) else None)


#: Classes of the O-star models' probability columns (``p_<class>``; X: hot non-MK impostors).
OSTAR_CLASSES: tuple[str, ...] = ("O", "B", "A", "F", "G", "K", "M", "X")
_EVIDENCE_BOOL = ("heii_detected", "heii_4686_emission", "metal_veto")
_EVIDENCE_DESCRIPTIONS = {
    "heii_ew": "weighted mean EW of the He II lines", "heii_ew_err": "error of heii_ew",
    "hei_ew": "weighted mean EW of the He I lines", "hei_ew_err": "error of hei_ew",
    "hei_sigma": "combined significance of He I absorption",
    "log_wprime": "log10 EW(He I 4471) / EW(He II 4541)",
    "n_heii_lines": "He II lines detected at >= 2 sigma",
    "heii_detected": "He II detected by the lines module's rule",
    "heii_4686_emission": "He II 4686 in emission",
    "metal_veto": "a cool-star metal line is too strong for an O star",
    "sdo_index": "hot-subdwarf index: mean EW(H-delta, H-gamma) + 2 EW(He II 4686), box EWs",
    "sdo_sigma": "sigma of the hot-subdwarf index above the O-star edge (lines.SDO_O_EDGE)",
}


def _evidence_field(name: str) -> "OutputField":
    kind = "bool" if name in _EVIDENCE_BOOL else "int" if name == "n_heii_lines" else "float"
    is_ew = name.startswith("ew_") or name in ("heii_ew", "heii_ew_err", "hei_ew", "hei_ew_err", "sdo_index")
    desc = _EVIDENCE_DESCRIPTIONS.get(name)
    if desc is None and name.startswith("ew_"):
        line = name[3:].removesuffix("_err")
        desc = f"box EW of {line}" + (" (1-sigma error)" if name.endswith("_err") else
                                     ", positive for absorption")
    return OutputField(name, kind, "Angstrom" if is_ew else None, desc or "")


#: What :class:`OStarStage` writes: the ``results`` table's own columns, in order.
OSTAR_OUTPUTS: tuple[OutputField, ...] = (
    *(OutputField(f"p_{c.lower()}", "float", None,
                  "calibrated probability of class O (training-balanced classes)" if c == "O"
                  else f"calibrated probability of class {c}", index=c == "O")
      for c in OSTAR_CLASSES),
    OutputField("probs", "json", None, "class -> calibrated probability"),
    OutputField("predicted_class", "str", None, "class with the highest calibrated probability"),
    OutputField("flags", "int", None, "quality bit flags (stage.FLAG_*)"),
    OutputField("posterior_o", "float", None, "probability of class O at the survey prior (O ~ 2e-5)"),
    OutputField("is_candidate", "bool", None,
                "the model's O-candidate decision (posterior and He II evidence)", summary=True),
    OutputField("heii_sigma", "float", None,
                "combined significance of He II 4200/4541/4686/5411 absorption", index=True),
    OutputField("o_score", "float", None,
                "decision score: log10 survey-prior odds of O + weight x He II sigma"),
    *(_evidence_field(n) for n in EVIDENCE_FIELDS if n != "heii_sigma"),
)
_P_COLUMNS = tuple((c, f"p_{c.lower()}") for c in OSTAR_CLASSES)
#: The evidence outputs of :data:`OSTAR_OUTPUTS` (taken from ``StageResult.evidence``).
_EVIDENCE_OUTPUTS: tuple[str, ...] = tuple(n for n in EVIDENCE_FIELDS if n != "heii_sigma")


@dataclass
class SpectrumResult:
    """The fields every stage's result shares: the input, success or error, header metadata.

    Stages (the core :class:`StageResult`, plugins' own result records) subclass
    it and add their measurements, so the scanner and the catalogue can rely on
    these fields whatever the stage.  See :class:`StageResult` for the fields.
    """

    path: str
    ok: bool
    error_reason: str | None = None
    error_message: str | None = None
    obsid: int | None = None
    designation: str | None = None
    ra: float | None = None
    dec: float | None = None
    lmjd: int | None = None
    planid: str | None = None
    spid: int | None = None
    fiberid: int | None = None
    snr_g: float | None = None
    snr_r: float | None = None
    snr_i: float | None = None
    pipeline_class: str | None = None
    pipeline_subclass: str | None = None
    data_release: str | None = None
    layout: str | None = None

    @classmethod
    def failure(cls, path: str, reason: str, message: str,
                model_version: str | None = None, spectrum: Spectrum | None = None
                ) -> "SpectrumResult":
        """An ``ok=False`` result (keeps the header metadata when a spectrum was read)."""
        meta = spectrum_metadata(spectrum) if spectrum is not None else {}
        if model_version is not None:
            meta["model_version"] = model_version
        return cls(path=os.fspath(path), ok=False, error_reason=reason,
                   error_message=" ".join(str(message).split()), **meta)


@dataclass
class StageResult(SpectrumResult):
    """Result of a stage for one input (one spectrum, or one file that failed).

    Attributes
    ----------
    path : str
        Source file (the record's ``path`` for a Spectrum input).
    ok : bool
        False if the item could not be classified; then ``error_reason`` (short
        code, e.g. ``"corrupt"``, ``"no_usable_pixels"``) and ``error_message``
        (one line) say why and the classification fields are None.
    obsid, designation, ra, dec, lmjd, planid, spid, fiberid
        Identifiers and position from the header.
    snr_g, snr_r, snr_i : float or None
        LAMOST pipeline S/N per band.
    pipeline_class, pipeline_subclass, data_release, layout : str or None
        From the file.
    probs : dict or None
        Class -> calibrated probability (sums to 1).
    p_o : float or None
        Calibrated probability of class O (training-balanced classes).
    predicted_class : str or None
        Class of highest probability.
    flags : int
        Quality bit flags, ``FLAG_*``.
    model_version : str or None
        Model version that produced the result (its card holds the decision).
    posterior_o : float or None
        Probability of class O at the survey prior (O ~ 2e-5 of spectra).
    is_candidate : bool or None
        The model's O-candidate decision (posterior and He II evidence).
    heii_sigma : float or None
        Combined significance of He II absorption (4200, 4541, 4686, 5411 A).
    evidence : dict or None
        The line evidence, keys :data:`EVIDENCE_FIELDS`: combined He II / He I
        EWs and significances, log W', line EWs [A] and errors.
    o_score : float or None
        The decision's O score (log10 survey-prior odds + weight x He II
        sigma; :mod:`lamost_ostar.models.decision`), None for rules without one.
    """

    probs: dict[str, float] | None = None
    p_o: float | None = None
    predicted_class: str | None = None
    flags: int = 0
    model_version: str | None = None
    posterior_o: float | None = None
    is_candidate: bool | None = None
    heii_sigma: float | None = None
    evidence: dict[str, Any] | None = None
    o_score: float | None = None



@runtime_checkable
class Stage(Protocol):
    """What :mod:`lamost_ostar.scan` needs from a stage (see the module docstring).

    ``name``, ``version`` and ``outputs`` (class attributes) declare what the
    stage writes; a stage without them still runs, its results stored with the
    shared fields only.
    """

    model_version: str | None

    def process(self, items: Sequence[str | os.PathLike | Spectrum]) -> list[Any]:
        """One result per item, in input order; never raises for a bad item."""


def accepts_prepared(stage: Any) -> bool:
    """Whether ``stage`` takes an already prepared batch (``process_prepared``).

    A stage may define ``process_prepared(spectra, prep)``: the same results
    as ``process(spectra)``, from the :class:`~lamost_ostar.preprocess.PreparedBatch`
    ``prep = prepare(spectra, continuum=True)`` computed once for every such
    stage of a scan (one preprocessing per file, whatever the number of stages).
    """
    return callable(getattr(stage, "process_prepared", None))


def decode_flags(flags: int) -> list[str]:
    """Names of the bits set in ``flags`` (see :data:`FLAG_NAMES`)."""
    return [name for bit, name in FLAG_NAMES.items() if int(flags) & bit]


def spectrum_metadata(s: Spectrum) -> dict[str, Any]:
    """The header fields of a StageResult taken from a Spectrum (for stages and plugins)."""
    snr = s.snr or {}
    return dict(
        obsid=s.obsid, designation=s.designation, ra=s.ra, dec=s.dec, lmjd=s.lmjd,
        planid=s.planid, spid=s.spid, fiberid=s.fiberid,
        snr_g=snr.get("g"), snr_r=snr.get("r"), snr_i=snr.get("i"),
        pipeline_class=s.pipeline_class, pipeline_subclass=s.pipeline_subclass,
        data_release=s.data_release, layout=s.layout,
    )


def read_items(items: Sequence[Any], engine: str = DEFAULT_ENGINE, reader: Any = None
               ) -> tuple[list[Spectrum], list[int], dict[int, tuple[str, str, str]]]:
    """Read the file paths among ``items``; :class:`Spectrum` records pass through.

    Parameters
    ----------
    items : sequence of str, path-like or Spectrum
        One batch of a stage's inputs.
    engine : str
        Reader engine of :func:`lamost_ostar.io.read_spectra` (the LAMOST reader).
    reader : str or reader object, optional
        A reader plugin (entry point group ``lamost_ostar.readers``) by name, or
        an object with ``read(path) -> Spectrum`` raising
        :class:`lamost_ostar.io.ReadError`; default: the LAMOST reader with
        ``engine``.  Any other exception of a reader gives the reason
        ``read_failed``.

    Returns
    -------
    spectra : list of Spectrum
        The readable inputs.
    slots : list of int
        Input index of each of ``spectra``.
    failed : dict
        Input index -> ``(path, reason, message)`` for every input that could
        not be read (an input the reader did not report back is ``unreadable``).
    """
    spectra: list[Spectrum] = []
    slots: list[int] = []
    failed: dict[int, tuple[str, str, str]] = {}
    path_idx = [i for i, it in enumerate(items) if not isinstance(it, Spectrum)]
    if isinstance(reader, str):
        from lamost_ostar.io import load_reader

        reader = load_reader(reader, engine=engine)
    if path_idx and reader is not None:
        for i in path_idx:
            path = os.fspath(items[i])
            try:
                sp = reader.read(path)
            except ReadError as err:
                failed[i] = (path, err.reason, err.message)
                continue
            except Exception as exc:  # noqa: BLE001 - a plugin's bug is one file's error
                failed[i] = (path, "read_failed", " ".join(f"{type(exc).__name__}: {exc}".split())[:500])
                continue
            if not isinstance(sp, Spectrum):
                failed[i] = (path, "read_failed", f"reader returned {type(sp).__name__}, not a Spectrum")
                continue
            spectra.append(sp)
            slots.append(i)
    elif path_idx:
        paths = [os.fspath(items[i]) for i in path_idx]
        batch = read_spectra(paths, engine=engine)
        queues: dict[str, deque[int]] = defaultdict(deque)
        for i, p in zip(path_idx, paths):
            queues[p].append(i)
        for err in batch.errors:
            if queues.get(err.path):
                failed[queues[err.path].popleft()] = (err.path, err.reason, err.message)
        for sp in batch.spectra:
            if queues.get(sp.path):
                slots.append(queues[sp.path].popleft())
                spectra.append(sp)
        for p, q in queues.items():  # anything the reader did not report back
            for i in q:
                failed[i] = (p, "unreadable", "no result from the reader")
    for i, it in enumerate(items):
        if isinstance(it, Spectrum):
            spectra.append(it)
            slots.append(i)
    return spectra, slots, failed


def quality_flags(mask: np.ndarray, good_fraction: np.ndarray, snr_g: np.ndarray,
                  pipeline_class: Sequence[str | None],
                  max_prob: np.ndarray | None = None) -> np.ndarray:
    """Quality bit flags of a prepared batch, vectorised.

    Parameters
    ----------
    mask : numpy.ndarray
        bool ``(N, NPIX)`` from :func:`lamost_ostar.preprocess.prepare`.
    good_fraction : numpy.ndarray
        ``(N,)`` fraction of good grid pixels.
    snr_g : numpy.ndarray
        ``(N,)`` g-band S/N, NaN where unknown.
    pipeline_class : sequence of str or None
        LAMOST pipeline CLASS per spectrum.
    max_prob : numpy.ndarray, optional
        ``(N,)`` highest class probability.

    Returns
    -------
    numpy.ndarray
        int64 ``(N,)`` bit flags.
    """
    n = len(good_fraction)
    flags = np.zeros(n, dtype=np.int64)
    snr_g = np.asarray(snr_g, dtype=np.float64)
    flags |= np.where(np.isfinite(snr_g) & (snr_g < LOW_SNR_G), FLAG_LOW_SNR, 0)
    flags |= np.where(~np.isfinite(snr_g), FLAG_NO_SNR, 0)
    flags |= np.where(np.asarray(good_fraction) < MIN_GOOD_FRACTION, FLAG_MASKED, 0)
    if n and mask.shape[1]:
        good = ~np.asarray(mask, dtype=bool)
        any_good = good.any(axis=1)
        lead = np.where(any_good, np.argmax(good, axis=1), mask.shape[1])
        trail = np.where(any_good, np.argmax(good[:, ::-1], axis=1), mask.shape[1])
        flags |= np.where((lead > EDGE_MAX_MISSING) | (trail > EDGE_MAX_MISSING), FLAG_EDGE, 0)
    cls = np.array([(c or "").strip().upper() for c in pipeline_class], dtype=object)
    not_star = np.array([c not in ("", "STAR") for c in cls], dtype=bool) if n else \
        np.zeros(0, bool)
    flags |= np.where(not_star, FLAG_NOT_STAR, 0)
    if max_prob is not None:
        flags |= np.where(np.asarray(max_prob) < MIN_CONFIDENCE, FLAG_LOW_CONFIDENCE, 0)
    return flags


# --------------------------------------------------------------------------
# device handling
# --------------------------------------------------------------------------
#: Environment switch of :func:`import_keras`: ``1`` imports Keras without the optional
#: modules below (the scan's local workers set it; unset or ``0``: a plain ``import keras``).
LEAN_KERAS_ENV = "LAMOST_OSTAR_LEAN_KERAS"
#: Optional packages ``import keras`` loads at start-up for features inference never uses:
#: matplotlib (``keras.visualization``) and scikit-learn (``keras.wrappers``); about a third
#: of the import time measured on the 2-core dev machine (reports/performance.md).
LEAN_SKIPPED = ("matplotlib", "sklearn")


def import_keras(lean: bool | None = None) -> Any:
    """Import Keras once per process; ``lean`` without :data:`LEAN_SKIPPED`.

    Keras imports matplotlib and scikit-learn only if they are installed
    (``try: import ... except ImportError``); in lean mode they are hidden
    while Keras is imported, so its plotting helpers and scikit-learn wrappers
    are unavailable in that process (the packages themselves can still be
    imported afterwards).  Nothing changes if Keras is already imported.

    Parameters
    ----------
    lean : bool, optional
        Default: the environment variable :data:`LEAN_KERAS_ENV` is ``1``.
    """
    import sys

    if "keras" in sys.modules:
        return sys.modules["keras"]
    if lean is None:
        lean = os.environ.get(LEAN_KERAS_ENV, "0") == "1"
    hidden = [m for m in LEAN_SKIPPED if m not in sys.modules] if lean else []
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # "import m" raises ImportError
    try:
        import keras
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    return keras


#: How :class:`OStarStage` evaluates its model: ``auto`` (below), ``keras`` or ``numpy``
#: (:mod:`lamost_ostar.models.numpy_runtime`: the same ``model.keras`` on the CPU, no Keras import).
INFERENCE_ENGINES = ("auto", "keras", "numpy")
#: Environment switch: ``keras`` or ``numpy`` is what ``engine="auto"`` resolves to.
ENGINE_ENV = "LAMOST_OSTAR_ENGINE"
#: Device files (glob patterns) whose presence means this machine may have a GPU (NVIDIA, AMD
#: ROCm): where one exists, ``engine="auto"`` with ``device="auto"`` uses Keras, which finds out
#: whether it can use it; the CLI's ``--device gpu`` check uses the same list.
GPU_DEVICE_FILES = ("/proc/driver/nvidia/gpus/*", "/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/kfd")


def gpu_device_present() -> bool:
    """Whether the kernel lists a GPU device (:data:`GPU_DEVICE_FILES`) that
    ``CUDA_VISIBLE_DEVICES`` does not hide; no GPU library is imported."""
    import glob

    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return False
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def resolve_engine(device: str = "auto", engine: str = "auto") -> str:
    """The inference engine for ``device`` and ``engine`` (``"keras"`` or ``"numpy"``).

    ``engine="auto"``: the value of :data:`ENGINE_ENV` if set; else Keras for
    ``device="gpu"``, numpy for ``device="cpu"``, and for ``device="auto"``
    Keras when a GPU device is present (:func:`gpu_device_present`), numpy
    otherwise: a CPU-only worker then never imports Keras and its backend.
    ``engine="numpy"`` with ``device="gpu"`` is an error.
    """
    if engine not in INFERENCE_ENGINES:
        raise ValueError(f"engine must be one of {', '.join(INFERENCE_ENGINES)}, got {engine!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if engine == "auto":
        env = os.environ.get(ENGINE_ENV, "").strip().lower()
        if env and env not in ("keras", "numpy"):
            raise ValueError(f"{ENGINE_ENV} must be 'keras' or 'numpy', got {env!r}")
        if env:
            engine = env
        elif device == "gpu":
            engine = "keras"
        elif device == "cpu":
            engine = "numpy"
        else:
            engine = "keras" if gpu_device_present() else "numpy"
    if engine == "numpy" and device == "gpu":
        raise ValueError("the numpy engine runs on the CPU only: use engine 'keras' (or 'auto') for device 'gpu'")
    return engine


def _backend_sees_gpu() -> bool:
    """Whether the active Keras backend sees a GPU (backend-specific, isolated here)."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken GPU stack means "no GPU"
        return False
    return False


def resolve_device(device: str = "auto") -> str:
    """Keras device name for ``device`` (``"auto"``, ``"cpu"`` or ``"gpu"``).

    ``"auto"`` gives ``"gpu:0"`` when the Keras backend sees a GPU, else
    ``"cpu:0"``; ``"gpu"`` raises :class:`RuntimeError` when none is visible.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu:0"
    has_gpu = _backend_sees_gpu()
    if device == "gpu" and not has_gpu:
        import keras

        raise RuntimeError(f"device 'gpu' asked for, but the Keras backend "
                           f"{keras.backend.backend()!r} sees no GPU")
    return "gpu:0" if has_gpu else "cpu:0"


# --------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------
class OStarStage:
    """Classify LAMOST spectra with a registered model version.

    The model is loaded once, in the constructor.  :meth:`process` reads the
    files (fitsio), resamples and standardises them on the common grid
    (vectorised over the batch) and runs batched inference on the chosen
    device.

    Parameters
    ----------
    model_version : str, optional
        Model version in the registry; None = newest user version, else the
        packaged default (see :func:`lamost_ostar.models.registry.load_model`).
    models_dir : str or path-like, optional
        Directory of user model versions.
    device : {"auto", "cpu", "gpu"}
        Inference device; ``"auto"`` uses a GPU when the Keras backend sees one.
    engine : {"auto", "keras", "numpy"}
        What evaluates the model (:func:`resolve_engine`): ``numpy`` (the CPU,
        no Keras import) or ``keras`` (CPU or GPU).  A model the numpy engine
        cannot evaluate (a layer it does not know) falls back to Keras when
        ``engine="auto"``.  The two agree to about 1e-5 of a logit (tests).
    batch_size : int
        Spectra read, prepared and classified together (bounds memory).
    read_engine : str
        Reader engine (:data:`lamost_ostar.io.ENGINES`).
    class_veto : bool
        A spectrum whose LAMOST pipeline CLASS is in :data:`VETO_CLASSES`
        (GALAXY, QSO) is not a candidate whatever the rule says; it gets
        :data:`FLAG_CLASS_VETO` when the rule said O.  ``False``: the rule alone.
    min_snr_g : float or None
        A spectrum with S/N(g) below it is not a candidate whatever the rule
        says (:data:`FLAG_SNR_FLOOR` when the rule said O); unknown S/N passes;
        None or 0: no floor.

    Attributes
    ----------
    model_version : str
        The resolved model version.
    classes : tuple of str
        Class labels of the model outputs.
    device_name : str
        Device used (``"cpu:0"`` or ``"gpu:0"``).
    engine : str
        ``"keras"`` or ``"numpy"``.
    """

    #: Entry point name, and the name of the stage's table (``results`` for this stage).
    name = "ostar"
    #: Version of this stage's outputs (the model has its own ``model_version``).
    version = "ostar-2"  # ostar-2: the S/N floor (min_snr_g) and the pipeline-class veto (class_veto)
    #: What each result holds besides the shared fields (the ``results`` table's columns).
    outputs = OSTAR_OUTPUTS

    @staticmethod
    def output_values(result: Any) -> dict[str, Any]:
        """The declared outputs of a result (a StageResult, or a mapping with its keys).

        ``p_<class>`` come from ``probs`` (class labels in any case; ``p_o`` from
        the result's own ``p_o`` when set); the evidence columns from ``evidence``.
        """
        probs_in = _get(result, "probs") or {}
        probs = {str(k): _to_float(v) for k, v in probs_in.items()}
        upper = {k.upper(): v for k, v in probs.items()}
        row: dict[str, Any] = {col: upper.get(c) for c, col in _P_COLUMNS}
        p_o = _to_float(_get(result, "p_o"))
        row["p_o"] = p_o if p_o is not None else upper.get("O")
        row["probs"] = probs or None
        row["predicted_class"] = _get(result, "predicted_class")
        row["flags"] = _to_int(_get(result, "flags")) or 0
        for key in ("posterior_o", "is_candidate", "heii_sigma", "o_score"):
            row[key] = _get(result, key)
        evidence = _get(result, "evidence")
        if evidence and _is_mapping_type(type(evidence)):
            get = evidence.get
            row.update({name: get(name) for name in _EVIDENCE_OUTPUTS})
        else:
            row.update(dict.fromkeys(_EVIDENCE_OUTPUTS))
        return row

    def __init__(self, model_version: str | None = None,
                 models_dir: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int = 256, read_engine: str = DEFAULT_ENGINE,
                 class_veto: bool = True, min_snr_g: float | None = MIN_SNR_G,
                 engine: str = "auto") -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if read_engine not in ENGINES:
            raise ValueError(f"read_engine must be one of {', '.join(ENGINES)}, got {read_engine!r}")
        self.batch_size = int(batch_size)
        self.read_engine = read_engine
        self.class_veto = bool(class_veto)
        self.min_snr_g = None if min_snr_g is None or float(min_snr_g) <= 0 else float(min_snr_g)
        from lamost_ostar.models.registry import load_model

        self.engine = resolve_engine(device, engine)
        self.bundle = None
        if self.engine == "numpy":
            from lamost_ostar.models.numpy_runtime import UnsupportedModelError

            try:
                self.bundle = load_model(model_version, models_dir, engine="numpy")
                self.device_name = "cpu:0"
            except UnsupportedModelError as exc:
                if engine == "numpy":
                    raise
                import logging

                logging.getLogger(__name__).warning(
                    "the numpy engine cannot evaluate this model (%s); using Keras", exc)
                self.engine = "keras"
        if self.bundle is None:
            import_keras()
            self.device_name = resolve_device(device)
            self.bundle = load_model(model_version, models_dir)
        # one inference at a time per stage: several worker threads may share the
        # stage (reading/preparing overlap with inference; Keras' predict is not
        # guaranteed thread-safe)
        self._predict_lock = threading.Lock()
        try:
            params = inspect.signature(self.bundle.predict_proba).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        self._pass_batch_size = "batch_size" in params
        self.model_version: str = str(self.bundle.version)
        self.channels: int = int(getattr(self.bundle, "channels", 1))
        card = dict(getattr(self.bundle, "card", None) or {})
        card.setdefault("classes", list(self.bundle.classes))
        self.decision: Decision = Decision.from_card(card)
        self.classes: tuple[str, ...] = tuple(str(c) for c in self.bundle.classes)
        try:
            self._o_index: int | None = [c.upper() for c in self.classes].index("O")
        except ValueError:
            self._o_index = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_version={self.model_version!r}, "
                f"device={self.device_name!r}, engine={self.engine!r}, batch_size={self.batch_size}, "
                f"class_veto={self.class_veto}, min_snr_g={self.min_snr_g})")

    # -- public API
    def process(self, items: Sequence[str | os.PathLike | Spectrum]) -> list[StageResult]:
        """Classify a batch of files and/or spectra.

        Parameters
        ----------
        items : sequence of str, path-like or Spectrum
            Files are read with :func:`lamost_ostar.io.read_spectra` using
            ``read_engine`` (:data:`lamost_ostar.io.DEFAULT_ENGINE`, ``native``, by default).

        Returns
        -------
        list of StageResult
            One per item, in input order.  Unreadable files and spectra that
            cannot be prepared or classified give ``ok=False`` results with a
            reason; this method does not raise for a bad item.
        """
        items = list(items)
        out: list[StageResult] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._process_batch(items[start:start + self.batch_size]))
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for model input ``(N, NPIX[, channels])``."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2:
            x = x[..., None]
        if x.shape[-1] != self.channels:
            raise ValueError(f"model {self.model_version} takes {self.channels} input channel(s), "
                             f"got {x.shape[-1]}")
        if self.engine == "numpy":  # thread-safe: no state changes during inference
            return np.asarray(self.bundle.predict_proba(x, batch_size=self.batch_size), dtype=np.float64)
        import keras

        with self._predict_lock, keras.device(self.device_name):
            if self._pass_batch_size:
                probs = self.bundle.predict_proba(x, batch_size=self.batch_size)
            else:
                probs = self.bundle.predict_proba(x)
        if not isinstance(probs, np.ndarray):
            probs = keras.ops.convert_to_numpy(probs)
        return np.asarray(probs, dtype=np.float64)

    def process_prepared(self, spectra: Sequence[Spectrum], prep: PreparedBatch) -> list[StageResult]:
        """Classify spectra already prepared by the caller (shared preprocessing).

        Parameters
        ----------
        spectra : sequence of Spectrum
            The records ``prep`` was made from, in the same order.
        prep : PreparedBatch
            ``preprocess.prepare(spectra, continuum=True)`` (or its
            :meth:`~lamost_ostar.preprocess.PreparedBatch.subset`).

        Returns
        -------
        list of StageResult
            The same as ``process(spectra)``, one per spectrum, in order.
        """
        spectra = list(spectra)
        if len(prep) != len(spectra):
            raise ValueError(f"{len(spectra)} spectra but a prepared batch of {len(prep)}")
        if self.channels == 2 and prep.xn is None:
            raise ValueError("the prepared batch has no continuum-normalised channel (continuum=True)")
        out: list[StageResult] = []
        for start in range(0, len(spectra), self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, len(spectra)))
            out.extend(self._classify(spectra[rows[0]:rows[-1] + 1], prep.subset(rows)))
        return out

    # -- internals
    def _process_batch(self, items: list[Any]) -> list[StageResult]:
        results: list[StageResult | None] = [None] * len(items)
        spectra, slots, failed = read_items(items, self.read_engine)
        for i, (path, reason, message) in failed.items():
            results[i] = StageResult.failure(path, reason, message, self.model_version)
        if spectra:
            for i, res in zip(slots, self._classify(spectra)):
                results[i] = res
        return results  # type: ignore[return-value]

    def _classify(self, spectra: list[Spectrum], prep: PreparedBatch | None = None) -> list[StageResult]:
        try:
            if prep is None:
                prep = prepare(spectra, continuum=self.channels == 2)
        except Exception as exc:  # noqa: BLE001 - isolate the spectrum that fails
            if len(spectra) == 1:
                return [StageResult.failure(spectra[0].path, "prepare_failed",
                                            f"{type(exc).__name__}: {exc}",
                                            self.model_version, spectra[0])]
            return [r for s in spectra for r in self._classify([s])]
        x = prep.x
        finite = np.all(np.isfinite(x), axis=1)
        usable = finite & (prep.good_fraction > 0) & np.any(x != 0, axis=1)
        probs = np.full((len(spectra), len(self.classes)), np.nan)
        if usable.any():
            probs[usable] = self.predict_proba(model_input(prep, self.channels)[usable])
        probs_ok = usable & np.all(np.isfinite(probs), axis=1)
        max_prob = np.where(probs_ok, np.nanmax(np.where(probs_ok[:, None], probs, 0.0), axis=1),
                            np.nan)
        snr_g = np.array([np.nan if (s.snr or {}).get("g") is None else s.snr["g"]
                          for s in spectra], dtype=np.float64)
        pipeline_class = [s.pipeline_class for s in spectra]
        flags = quality_flags(prep.mask, prep.good_fraction, snr_g, pipeline_class, max_prob)
        best = np.argmax(np.where(probs_ok[:, None], probs, -1.0), axis=1)
        # He II evidence on the spectrum itself, and the card's candidate rule
        meas = _lines.measure_lines(prep.flux, prep.ivar, prep.mask)
        heii = np.asarray(meas.heii_sigma, dtype=np.float64)
        flags |= np.where(~np.isfinite(heii), FLAG_NO_HE_LINES, 0)
        flags |= np.where(np.asarray(meas.heii_4686_emission, bool), FLAG_HEII_EMISSION, 0)
        evid = evidence_records(meas)
        has_o = "O" in self.decision.classes and self.decision.classes == list(self.classes)
        verdict = (self.decision.apply(np.where(probs_ok[:, None], probs, 0.0), heii,
                                       np.asarray(meas.sdo_index, dtype=np.float64),
                                       np.asarray(meas.sdo_sigma, dtype=np.float64))
                   if has_o else None)
        if verdict is not None:
            # the stage's own conditions on top of the card's rule: flagged where they said no
            faint = below_snr_floor(snr_g, self.min_snr_g) & verdict.is_candidate
            flags |= np.where(faint, FLAG_SNR_FLOOR, 0)
            vetoed = (class_vetoed(pipeline_class) if self.class_veto
                      else np.zeros(len(spectra), bool)) & verdict.is_candidate
            flags |= np.where(vetoed, FLAG_CLASS_VETO, 0)
            verdict.is_candidate = verdict.is_candidate & ~faint & ~vetoed

        out: list[StageResult] = []
        for k, s in enumerate(spectra):
            if not usable[k]:
                reason = "non_finite" if not finite[k] else "no_usable_pixels"
                out.append(StageResult.failure(s.path, reason,
                                               "spectrum cannot be prepared for the model",
                                               self.model_version, s))
                continue
            if not probs_ok[k]:
                out.append(StageResult.failure(s.path, "non_finite_output",
                                               "model returned non-finite probabilities",
                                               self.model_version, s))
                continue
            row = probs[k]
            out.append(StageResult(
                path=s.path, ok=True, **spectrum_metadata(s),
                probs={c: float(p) for c, p in zip(self.classes, row)},
                p_o=None if self._o_index is None else float(row[self._o_index]),
                predicted_class=self.classes[int(best[k])],
                flags=int(flags[k]), model_version=self.model_version,
                posterior_o=None if verdict is None else float(verdict.posterior_o[k]),
                is_candidate=None if verdict is None else bool(verdict.is_candidate[k]),
                heii_sigma=float(heii[k]) if np.isfinite(heii[k]) else None,
                evidence=evid[k],
                o_score=(None if verdict is None or verdict.score is None or not np.isfinite(verdict.score[k])
                         else float(verdict.score[k])),
            ))
        return out


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def available_stages() -> dict[str, str]:
    """Registered stages: entry point name -> ``"module:attr"``."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_stage(name: str = "ostar", **kwargs: Any) -> Any:
    """Build a stage registered in the ``lamost_ostar.stages`` entry point group.

    Parameters
    ----------
    name : str
        Entry point name (``"ostar"`` for :class:`OStarStage`), or a
        ``"package.module:attribute"`` reference to a stage class not
        registered (e.g. while developing a plugin).
    **kwargs
        Passed to the stage constructor.

    Returns
    -------
    object
        The stage instance.

    Raises
    ------
    LookupError
        No stage of that name is registered.
    """
    return _eps.load(ENTRY_POINT_GROUP, name)(**kwargs)

