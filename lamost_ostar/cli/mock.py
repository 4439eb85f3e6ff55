"""``lamost-ostar mock``: write a mock LAMOST low-resolution data release."""
from __future__ import annotations

import os

import click


def _parse_snr_range(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not 'LO,HI'", param_hint="'--snr-range'") from None
    return lo, hi


@click.command("mock")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--n", "n", type=int, default=1000, show_default=True, help="Number of spectra (files).")
@click.option("--preset", default="survey", show_default=True,
              help="Class fractions: 'survey' (real imbalance, O ~1e-5), 'balanced', "
                   "or explicit fractions like 'O=0.1,B=0.2,F=0.7'.")
@click.option("--layout", type=click.Choice(["image", "coadd", "dr1"]), default="image",
              show_default=True, help="DR7 image (default), DR9+ COADD table, or DR1 layout.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Master seed (same seed -> same release, any --workers).")
@click.option("--broken-rate", type=float, default=0.0, show_default=True,
              help="Fraction of broken files (truncated gzip, non-FITS, empty, NaN flux).")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes.")
@click.option("--snr-range", default=None, help="Keep SNRG within 'LO,HI'.")
@click.option("--compresslevel", type=int, default=1, show_default=True, help="gzip level 0-9.")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Spectra per vectorised batch / worker task.")
@click.option("--interstellar", is_flag=True,
              help="Add the interstellar lines and diffuse bands of each spectrum's E(B-V) "
                   "(Na I D, Ca II H & K, K I, the 4428/5780/6284 A bands, ...).")
@click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty OUTDIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def mock(outdir: str, n: int, preset: str, layout: str, seed: int, broken_rate: float,
         workers: int, snr_range: str | None, compresslevel: int, batch_size: int,
         interstellar: bool, overwrite: bool, quiet: bool) -> None:
    """Write a mock LAMOST release of N spectra under OUTDIR.

    Files: OUTDIR/<LMJD>/<PLANID>/spec-<LMJD>-<PLANID>_sp<SS>-<FFF>.fits.gz, and the
    truth table OUTDIR/truth.csv.
    """
    from lamost_ostar.mock import MockConfig, write_release

    if n < 0:
        raise click.BadParameter(f"{n} must be >= 0", param_hint="'--n'")
    if workers < 1:
        raise click.BadParameter(f"{workers} must be >= 1", param_hint="'--workers'")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.UsageError(f"{outdir} exists and is not a directory")
    if os.path.isdir(outdir) and os.listdir(outdir) and not overwrite:
        raise click.UsageError(f"{outdir} is not empty (use --overwrite to write into it)")
    cfg = MockConfig(n=n, preset=preset, layout=layout, seed=seed, broken_rate=broken_rate,
                     snr_range=_parse_snr_range(snr_range), compresslevel=compresslevel,
                     batch_size=batch_size, interstellar=interstellar)
    try:
        cfg.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc).splitlines()[0]) from None
    try:
        summary = write_release(outdir, cfg, workers=workers, progress=not quiet)
    except OSError as exc:
        raise click.ClickException(f"cannot write to {outdir}: {exc.strerror or exc}") from None
    counts = " ".join(f"{k}={v}" for k, v in summary.class_counts.items())
    click.echo(f"wrote {summary.n_files} files ({summary.n_broken} broken, "
               f"{summary.bytes_written / 1e6:.1f} MB) to {outdir} in {summary.seconds:.1f} s "
               f"({summary.files_per_second:.0f} files/s, {workers} worker(s)); {counts}")
    click.echo(f"truth table: {summary.truth_path}")
