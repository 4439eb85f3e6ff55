"""Models: locally connected layer, LCGAN/SGAN, recogniser, calibration, SVM metrics, registry.

Everything is Keras 3 with ``keras``/``keras.ops`` only (TensorFlow default; the
tests also pass under the JAX and PyTorch backends).  Importing
:mod:`~lamost_ostar.models.layers` (the registry does) registers the custom
layers with Keras' serialisation, so saved ``model.keras`` files load.  The
submodules are imported explicitly:

:mod:`~lamost_ostar.models.layers`
    :class:`LocallyConnected1D` (unshared 1-D convolution, eq. 6 lengths, one
    batched matmul), :class:`ChannelAttention1D` (the paper's Figure 6 block).
:mod:`~lamost_ostar.models.gan`
    ``make_lcgan(npix)`` / ``make_sgan(npix)`` -> :class:`~.gan.GANTrainer` with
    ``fit(real_x, iterations, batch_size, checkpoint_every=, checkpoint_dir=,
    callback=, seed=)`` and ``sample(n, seed)`` -> ``(n, npix)`` spectra (eq. 1);
    ``load_generator(path)``, ``sample_generator(generator, n, seed)``.
:mod:`~lamost_ostar.models.recogniser`
    ``CLASSES_7``, ``CLASSES_4``, ``build_recogniser(n_classes, npix)``,
    ``train_recogniser(x_tr, y_tr, x_val, y_val, ...) -> (model, history)``
    (Adam 1e-4, early stopping on val loss, patience 5), ``predict_logits``.
:mod:`~lamost_ostar.models.calibration`
    ``fit_temperature(logits, labels) -> T``, ``softmax_t(logits, T)``.
:mod:`~lamost_ostar.models.svm`
    ``gan_test(real_x, real_y, gen_x, gen_y)``, ``gan_train(gen_x, gen_y, real_x,
    real_y)`` (RBF ``NuSVC``), ``fit_svm``, ``svm_accuracy``.
:mod:`~lamost_ostar.models.registry`
    ``save_model_version(model, root, card_fields) -> version``,
    ``list_versions(root)``, ``load_model(version=None, models_dir=None) ->
    ModelBundle`` (``predict_proba`` = softmax(logits / T), ``classes``,
    ``version``, ``card``, ``model``), ``default_models_dir()`` for the CLI.
:mod:`~lamost_ostar.models.decision`
    the O-candidate rule (pure numpy, no Keras): ``Decision`` (prior-adjusted
    posterior + He II evidence thresholds, stored in the card),
    ``prior_adjust``, ``choose_operating_point``.

The layer classes are imported lazily (``lamost_ostar.models.LocallyConnected1D``
imports Keras on first use), so that the numpy-only submodules such as
``decision`` can be used without importing a deep-learning backend.
"""
from __future__ import annotations

__all__ = ["LocallyConnected1D", "ChannelAttention1D", "lc_output_length"]


def __getattr__(name: str):
    if name in __all__:
        from . import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
