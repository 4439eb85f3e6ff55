"""Model registry: versioned recogniser models with model cards.

Layout (DESIGN.md)::

    <root>/<version>/model.keras   the Keras 3 model (outputs logits)
    <root>/<version>/card.json     the model card (see :func:`save_model_version`)
    <root>/<version>/card.md       the same card, human readable

``<root>`` is either a user models directory (passed explicitly; the CLI's
default is :func:`default_models_dir`) or the packaged default directory
``lamost_ostar/data/models/``.  A version is named
``<prefix>-YYYYMMDD-HHMMSS-<sha8>`` (UTC; ``prefix`` defaults to ``ostar<C>``
for ``C`` classes, ``sha8`` = first 8 hex digits of the model file's SHA-256)
and is never overwritten: a clash gets a ``-2``, ``-3``... suffix.

:func:`load_model` returns a :class:`ModelBundle` whose
:meth:`~ModelBundle.predict_proba` applies ``softmax(logits / T)`` with the
card's calibration temperature ``T``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import code_version
from .calibration import softmax_t

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from .numpy_runtime import NumpyGraph

__all__ = [
    "PACKAGED_MODELS_DIR",
    "MODELS_DIR_ENV",
    "ModelBundle",
    "ModelNotFoundError",
    "ModelIntegrityError",
    "default_models_dir",
    "save_model_version",
    "list_versions",
    "load_model",
    "ENGINES",
    "sha256_file",
    "code_version",
]

#: where the default model shipped with the package lives
PACKAGED_MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
#: environment variable the CLI reads for the user models directory
MODELS_DIR_ENV = "LAMOST_OSTAR_MODELS"

MODEL_FILE = "model.keras"
#: How :func:`load_model` evaluates a model: ``keras`` (any backend, CPU or GPU) or
#: ``numpy`` (:mod:`lamost_ostar.models.numpy_runtime`: CPU, no Keras import).
ENGINES = ("keras", "numpy")
CARD_FILE = "card.json"
CARD_MD = "card.md"
#: card keys computed by :func:`save_model_version` (``card_fields`` cannot set them)
COMPUTED_KEYS = ("version", "created", "sha256", "keras_backend", "keras_version",
                 "backend_version", "code_version", "n_params", "input_shape")


#: what each input channel count means (written into every card: a model
#: version describes its own normaliser)
_INPUT_DESCRIPTION: dict[int, dict[str, Any]] = {
    1: {"channels": ["x: resampled flux / its L2 norm (paper eq. 1)"],
        "prepare": "lamost_ostar.preprocess.model_input(prepare(spectra), channels=1)"},
    2: {"channels": ["x: resampled flux / its L2 norm (paper eq. 1)",
                     "xn: flux / pseudo-continuum (preprocess.normalise: 0.8 quantile of the "
                     "5-pixel boxcar-smoothed flux in 64-pixel blocks, strong lines excluded, "
                     "linear between blocks; 1 where masked)"],
        "prepare": "lamost_ostar.preprocess.model_input(prepare(spectra), channels=2)"},
}


class ModelNotFoundError(LookupError):
    """No model version matches the request (message lists where it looked)."""


class ModelIntegrityError(ValueError):
    """``model.keras`` does not match the SHA-256 recorded in its card."""


def default_models_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The CLI's default user models directory.

    ``$LAMOST_OSTAR_MODELS`` if set, else ``~/.lamost_ostar/models``.  The
    library functions never read it implicitly: pass it as ``models_dir``.
    """
    env = os.environ if environ is None else environ
    value = env.get(MODELS_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".lamost_ostar" / "models"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _keras() -> Any:
    """Keras, with this package's custom layers registered (imported on first use)."""
    import keras

    from . import layers as _layers  # noqa: F401  (registers the custom layers)

    return keras


def _backend_versions() -> dict[str, str]:
    keras = _keras()
    backend = keras.backend.backend()
    package = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend)
    try:
        return {package: metadata.version(package)}
    except metadata.PackageNotFoundError:
        return {}


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _card_markdown(card: Mapping[str, Any]) -> str:
    lines = [f"# Model card: {card['version']}", ""]
    for key, value in card.items():
        if isinstance(value, (dict, list)):
            value = "`" + json.dumps(value, sort_keys=True) + "`"
        lines.append(f"- **{key}**: {value}")
    return "\n".join(lines) + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_version(model: keras.Model, root: str | Path,
                       card_fields: Mapping[str, Any]) -> str:
    """Save ``model`` as a new version under ``root`` and return the version name.

    Parameters
    ----------
    model : keras.Model
        A model ``(batch, npix, channels) -> (batch, C)`` logits (``channels``
        1: standardised flux; 2: + continuum-normalised flux).
    root : path
        Models directory (created if needed).
    card_fields : mapping
        Card content.  Required: ``classes`` (sequence of C class names).
        Usual: ``temperature`` (default 1.0), ``training_data`` (a description:
        sources, counts, seeds), ``metrics`` (dict), ``prefix`` (version
        prefix, default ``ostar<C>``).  Any other JSON-serialisable keys are
        kept.  ``npix`` defaults to the model's input length and must match it.

    Returns
    -------
    str
        The new version, e.g. ``ostar7-20261125-141500-1a2b3c4d``.

    Notes
    -----
    The card also records ``created`` (UTC ISO time), ``sha256`` of
    ``model.keras``, ``keras_backend``, ``keras_version``, ``backend_version``,
    ``code_version`` (package version + git describe), ``n_params`` and
    ``input_shape``.  Existing versions are never overwritten.
    """
    fields = dict(card_fields)
    bad = [k for k in COMPUTED_KEYS if k in fields]
    if bad:
        raise ValueError(f"card_fields may not set computed keys: {bad}")
    if "classes" not in fields:
        raise ValueError("card_fields needs 'classes'")
    classes = [str(c) for c in fields.pop("classes")]
    n_out = int(model.output_shape[-1])
    if len(classes) != n_out:
        raise ValueError(f"{len(classes)} classes but the model has {n_out} outputs")
    npix = int(model.input_shape[1])
    channels = int(model.input_shape[-1])
    if channels not in _INPUT_DESCRIPTION:
        raise ValueError(f"models take 1 or 2 input channels, this one {channels}")
    if int(fields.pop("npix", npix)) != npix:
        raise ValueError("card npix does not match the model's input length")
    temperature = float(fields.pop("temperature", 1.0))
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    prefix = str(fields.pop("prefix", f"ostar{len(classes)}"))
    keras = _keras()

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp_model = root / f".tmp-{uuid.uuid4().hex}.keras"
    try:
        model.save(tmp_model)
        digest = sha256_file(tmp_model)
        now = _utcnow()
        base = f"{prefix}-{now:%Y%m%d-%H%M%S}-{digest[:8]}"
        version, n = base, 1
        while True:
            try:
                (root / version).mkdir()
                break
            except FileExistsError:
                n += 1
                version = f"{base}-{n}"
        os.replace(tmp_model, root / version / MODEL_FILE)
    finally:
        tmp_model.unlink(missing_ok=True)

    card: dict[str, Any] = {
        "version": version,
        "created": now.isoformat(timespec="microseconds"),  # orders two saves in one second
        "classes": classes,
        "temperature": temperature,
        "npix": npix,
        "input_shape": [npix, channels],
        "input": _INPUT_DESCRIPTION[channels],
        "outputs": "logits",
        "n_params": int(model.count_params()),
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "backend_version": _backend_versions(),
        "code_version": code_version(),
        "training_data": fields.pop("training_data", None),
        "metrics": fields.pop("metrics", {}),
        "sha256": digest,
    }
    card.update(fields)
    _write_text_atomic(root / version / CARD_MD, _card_markdown(card))
    # card.json last: a version directory without it is incomplete and ignored
    _write_text_atomic(root / version / CARD_FILE, json.dumps(card, indent=2, sort_keys=False))
    return version


def _read_card(directory: Path) -> dict[str, Any] | None:
    try:
        card = json.loads((directory / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not (directory / MODEL_FILE).is_file():
        return None
    card["path"] = str(directory)
    return card


def list_versions(root: str | Path | None) -> list[dict[str, Any]]:
    """Cards of the complete versions under ``root``, oldest first.

    Each card dict gains ``path`` (its directory).  A missing ``root`` gives
    ``[]``; directories without a readable ``card.json`` and ``model.keras``
    (e.g. a save in progress) are skipped.
    """
    if root is None:
        return []
    root = Path(root)
    if not root.is_dir():
        return []
    cards = [c for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
             if (c := _read_card(d)) is not None]
    return sorted(cards, key=lambda c: (str(c.get("created", "")), c.get("version", "")))


@dataclass
class ModelBundle:
    """A loaded model version: the model, its card and its calibration.

    Attributes
    ----------
    model : keras.Model or lamost_ostar.models.numpy_runtime.NumpyGraph
        Outputs logits (a ``NumpyGraph`` when loaded with ``engine="numpy"``).
    card : dict
        The model card (``card.json`` plus ``path``).
    """

    model: "keras.Model | NumpyGraph"
    card: dict[str, Any]

    @property
    def engine(self) -> str:
        """``"keras"`` or ``"numpy"`` (:data:`ENGINES`): what evaluates the model."""
        from .numpy_runtime import NumpyGraph

        return "numpy" if isinstance(self.model, NumpyGraph) else "keras"

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card["classes"])

    @property
    def temperature(self) -> float:
        return float(self.card.get("temperature", 1.0))

    @property
    def npix(self) -> int:
        return int(self.card.get("npix", self.model.input_shape[1]))

    @property
    def channels(self) -> int:
        """Input channels the model takes (1: standardised flux; 2: + normalised flux)."""
        return int(self.model.input_shape[-1])

    @property
    def path(self) -> Path:
        return Path(self.card["path"])

    def predict_logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Raw logits ``(N, C)`` for model input ``(N, npix[, channels])``."""
        if self.engine == "numpy":
            x = np.asarray(x, dtype=np.float32)
            return self.model(x[..., None] if x.ndim == 2 else x, batch_size=batch_size)
        from .recogniser import predict_logits

        return predict_logits(self.model, x, batch_size=batch_size)

    def predict_proba(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / T)``, ``(N, C)`` float32, in
        the order of :attr:`classes`."""
        logits = self.predict_logits(x, batch_size=batch_size)
        return softmax_t(logits, self.temperature).astype(np.float32)

    def class_index(self, name: str) -> int:
        """Column of class ``name`` (e.g. ``"O"``) in :meth:`predict_proba`'s output."""
        return self.classes.index(name)


def _find(version: str, roots: list[Path]) -> Path | None:
    for root in roots:
        if (root / version / CARD_FILE).is_file():
            return root / version
    return None


def load_model(version: str | None = None, models_dir: str | Path | None = None, *,
               packaged_dir: str | Path | None = None, verify: bool = True,
               engine: str = "keras") -> ModelBundle:
    """Load a model version.

    Parameters
    ----------
    version : str, optional
        The version name.  ``None``: the newest version in ``models_dir`` if it
        holds any, else the packaged default.
    models_dir : path, optional
        The user models directory (searched before the packaged one).  Not read
        from the environment here: the CLI passes :func:`default_models_dir`.
    packaged_dir : path, optional
        Override of :data:`PACKAGED_MODELS_DIR` (tests).
    verify : bool
        Check ``model.keras`` against the card's SHA-256.
    engine : {"keras", "numpy"}
        ``keras``: ``keras.saving.load_model`` (imports the backend);
        ``numpy``: the same file evaluated by
        :class:`~lamost_ostar.models.numpy_runtime.NumpyGraph` (CPU, no Keras
        import; raises :class:`~lamost_ostar.models.numpy_runtime.UnsupportedModelError`
        for a layer it does not know).

    Returns
    -------
    ModelBundle

    Raises
    ------
    ModelNotFoundError
        Nothing matches (the message lists the directories searched and the
        versions available).
    ModelIntegrityError
        The model file does not match its card.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    packaged = Path(packaged_dir) if packaged_dir is not None else PACKAGED_MODELS_DIR
    roots = ([Path(models_dir).expanduser()] if models_dir is not None else []) + [packaged]
    if version is not None:
        directory = _find(str(version), roots)
        if directory is None:
            known = [c["version"] for r in roots for c in list_versions(r)]
            raise ModelNotFoundError(
                f"model version {version!r} not found in {', '.join(map(str, roots))}"
                f" (available: {', '.join(known) or 'none'})"
            )
    else:
        directory = None
        for root in roots:
            cards = list_versions(root)
            if cards:
                directory = Path(cards[-1]["path"])
                break
        if directory is None:
            where = ", ".join(map(str, roots))
            raise ModelNotFoundError(
                f"no model version found in {where}: the packaged default model is not "
                "installed and no user model exists; train one (lamost-ostar retrain) "
                "or pass a models directory that holds one"
            )
    card = _read_card(directory)
    if card is None:
        raise ModelNotFoundError(f"{directory} has no readable {CARD_FILE} / {MODEL_FILE}")
    model_path = directory / MODEL_FILE
    if verify and card.get("sha256") and sha256_file(model_path) != card["sha256"]:
        raise ModelIntegrityError(f"{model_path} does not match the sha256 in its card")
    if engine == "numpy":
        from .numpy_runtime import load_graph

        return ModelBundle(model=load_graph(model_path), card=card)
    model = _keras().saving.load_model(model_path, compile=False)
    return ModelBundle(model=model, card=card)
