"""Rebuild the reader's test fixtures ``tests/data/io_*`` from the shared real files.

Run from the repository root (needs ``../shared/data/lamost``)::

    python scripts/make_io_fixtures.py

Real files are copied byte for byte; the bad cases are derived from a real DR7
spectrum with fitsio (header kept, data altered) and gzip-compressed with a fixed
mtime so that the output is reproducible.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import fitsio
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAMOST = REPO.parent / "shared" / "data" / "lamost"
OUT = REPO / "tests" / "data"

IMAGE_PLAIN = LAMOST / "laspec" / "spec-58397-EG014118N254444M01_sp03-031.fits"  # DR7
IMAGE_GZ = LAMOST / "laspec" / "spec-57287-KP193637N444141V03_sp10-161.fits.gz"  # DR6
DR1 = LAMOST / "learninglamost_dr1" / "spec-55862-B6212_sp06-003.fits"
COADD_GZ = LAMOST / "cmost_dr7_vs_dr8" / "spec-55859-F5902_sp01-013_dr8.fits.gz"  # DR9
MEDRES = LAMOST / "laspec" / "med-58408-TD230151N343645T01_sp01-015.fits"
# DR7, CLASS GALAXY (z 0.087): two held-out LOSO rules called it O (reports/loso/run7)
GALAXY = LAMOST / "lamost_sbc" / "spec-58575-HD103621N361936B01_sp03-088.fits"


def _gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _write_image(dest: Path, data: np.ndarray, header: fitsio.FITSHDR, gz: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmpfile = Path(tmp) / "x.fits"
        fitsio.write(str(tmpfile), data, header=header, clobber=True)
        raw = tmpfile.read_bytes()
    dest.write_bytes(_gzip_bytes(raw) if gz else raw)


def _write_medres(dest: Path) -> None:
    """Small stand-in with the MRS HDU structure: header + COADD_B/COADD_R tables."""
    hdr = fitsio.read_header(str(MEDRES), 0)
    dtype = [("FLUX", "f4"), ("IVAR", "f4"), ("LOGLAM", "f4"),
             ("ANDMASK", "i2"), ("ORMASK", "i2")]
    with tempfile.TemporaryDirectory() as tmp:
        tmpfile = Path(tmp) / "x.fits"
        with fitsio.FITS(str(tmpfile), "rw", clobber=True) as f:
            f.write(None, header=hdr)
            for name, lam0 in (("COADD_B", np.log10(4950.0)), ("COADD_R", np.log10(6300.0))):
                t = np.zeros(64, dtype=dtype)
                t["FLUX"] = 1.0
                t["IVAR"] = 1.0
                t["LOGLAM"] = lam0 + 1e-5 * np.arange(64)
                f.write(t, extname=name)
        dest.write_bytes(tmpfile.read_bytes())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # real files, one per layout (plain and gzip)
    shutil.copyfile(IMAGE_PLAIN, OUT / "io_image_dr7.fits")
    shutil.copyfile(IMAGE_GZ, OUT / "io_image_dr6.fits.gz")
    # DR1 real bytes, gzip-compressed but named .fits (content, not name, decides)
    (OUT / "io_dr1_gzip.fits").write_bytes(_gzip_bytes(DR1.read_bytes()))
    shutil.copyfile(COADD_GZ, OUT / "io_coadd_dr9.fits.gz")
    (OUT / "io_galaxy_dr7.fits.gz").write_bytes(_gzip_bytes(GALAXY.read_bytes()))

    # files that are not (complete) FITS
    (OUT / "io_empty.fits").write_bytes(b"")
    (OUT / "io_not_fits.fits").write_text("This is not a FITS file, just text.\n")
    (OUT / "io_gzip_not_fits.fits.gz").write_bytes(_gzip_bytes(b"plain text, gzipped\n"))
    (OUT / "io_truncated.fits.gz").write_bytes(IMAGE_GZ.read_bytes()[:20000])
    (OUT / "io_truncated.fits").write_bytes(IMAGE_PLAIN.read_bytes()[:12000])

    # medium-resolution stand-in (the real 1 MB file is tested from shared data)
    _write_medres(OUT / "io_medres.fits")

    # altered copies of the real DR7 spectrum
    data = fitsio.read(str(IMAGE_PLAIN), 0)
    hdr = fitsio.read_header(str(IMAGE_PLAIN), 0)
    n = data.shape[1]

    d = data.copy()
    d[1] = 0.0
    _write_image(OUT / "io_zero_ivar.fits.gz", d, hdr, gz=True)

    d = data.copy()
    d[0, 100:120] = np.nan          # 20 NaN fluxes
    d[1, 2000:2003] = np.inf        # 3 infinite ivars
    _write_image(OUT / "io_nan_few.fits.gz", d, hdr, gz=True)

    d = data.copy()
    d[0, : int(0.8 * n)] = np.nan   # 80 % NaN
    _write_image(OUT / "io_nan_most.fits.gz", d, hdr, gz=True)

    d = data[:3].copy()
    d[0] = 1.0                      # constant flux keeps the fixture tiny
    _write_image(OUT / "io_short_rows.fits.gz", d, hdr, gz=True)

    total = sum(p.stat().st_size for p in OUT.glob("io_*"))
    for p in sorted(OUT.glob("io_*")):
        print(f"{p.stat().st_size:8d}  {p.name}")
    print(f"{total:8d}  total bytes")


if __name__ == "__main__":
    main()
