"""Fits the table of the AVX-512 ``tanh`` (``cs_tanh`` on ``cs_v16``, in ``cellspec/model/ops.py``)
and measures it: how the literal table there was made, and how to remake it.

Above |z| = 0.625 the vector tanh is a degree-5 polynomial in ``t = |z| - mid`` on each of 16
quarter-octaves ``[0.625, 0.75), [0.75, 0.875), ..., [8, 10)``, picked by the float's exponent and
its top two mantissa bits (``bits >> 21``, one ``vpermps`` per coefficient), and 1 from 9.0109 on
(where tanh rounds to 1 in float). Per interval: a least-squares fit of the relative error on 2,000
Chebyshev nodes in float64, reweighted towards minimax (Lawson's iteration), the coefficients
rounded to float; then every float of the interval is evaluated as the C++ does (the subtraction
``|z| - mid`` is exact, then Horner with FMA: each step one rounding to float) against float64's
tanh, and the error printed in units of the float spacing at the exact value.

    python benchmarks/fit_tanh_table.py            # the table, as C initialisers, and the errors
    python benchmarks/fit_tanh_table.py --degree 4 # what a lower degree costs (4.8 ulp)
"""

from __future__ import annotations

import argparse

import numpy as np

LOW = 0.625  # below it, Cephes's odd polynomial
SATURATE = 9.0109  # tanh rounds to 1 in float above ~9.01091


def intervals() -> list[tuple[float, float]]:
    first = int(np.float32(LOW).view(np.uint32)) >> 21
    out = []
    for j in range(16):
        lo = np.uint32((first + j) << 21).view(np.float32)
        hi = np.uint32((first + j + 1) << 21).view(np.float32)
        out.append((float(lo), float(hi)))
    return out


def fit(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """(mids [16], coefficients [16, degree + 1]) in float32."""
    mids, coefs = [], []
    for lo, hi in intervals():
        top = min(hi, SATURATE + 0.01)
        mid = np.float32((lo + hi) / 2)
        n = 2000
        xs = (lo + top) / 2 + (top - lo) / 2 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
        f = np.tanh(xs)
        v = np.vander(xs - float(mid), degree + 1, increasing=True)
        weight = np.ones(n)
        for _ in range(200):
            w = np.sqrt(weight) / f
            c = np.linalg.lstsq(v * w[:, None], f * w, rcond=None)[0]
            err = np.abs(v @ c - f) / f
            weight = weight * err / err.sum() * n
        mids.append(mid)
        coefs.append(c.astype(np.float32))
    return np.array(mids, dtype=np.float32), np.array(coefs, dtype=np.float32)


def errors(mids: np.ndarray, coefs: np.ndarray) -> list[float]:
    """The largest error per interval over every float in it (up to the saturation), in units of
    the float spacing at the exact value."""
    out = []
    for (lo, hi), mid, c in zip(intervals(), mids, coefs):
        top = min(hi, SATURATE)
        bits = np.arange(np.float32(lo).view(np.uint32), np.float32(top).view(np.uint32), dtype=np.uint32)
        x = bits.view(np.float32)
        t = (x - mid).astype(np.float64)  # exact (Sterbenz)
        p = np.full(x.shape, c[-1], dtype=np.float32)
        for ci in c[-2::-1]:  # an FMA: the product exact in float64, one rounding to float
            p = (p.astype(np.float64) * t + float(ci)).astype(np.float32)
        exact = np.tanh(x.astype(np.float64))
        spacing = np.spacing(exact.astype(np.float32)).astype(np.float64)
        out.append(float((np.abs(p - exact) / spacing).max()))
    return out


def c_float(v: np.float32) -> str:
    s = f"{float(v):.9g}"
    return (s if any(ch in s for ch in ".e") else s + ".0") + "f"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--degree", type=int, default=5)
    args = ap.parse_args()
    mids, coefs = fit(args.degree)
    print(f"alignas(64) static const float cs_tanh_tab[{args.degree + 2}][16] = {{")
    for row in [mids] + [coefs[:, i] for i in range(args.degree + 1)]:
        print("    {" + ", ".join(c_float(v) for v in row) + "},")
    print("};")
    for (lo, hi), e in zip(intervals(), errors(mids, coefs)):
        print(f"// [{lo:g}, {hi:g}): {e:.3f}")
    print(f"// worst: {max(errors(mids, coefs)):.3f}")


if __name__ == "__main__":
    main()
