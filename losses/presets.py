"""Named GeometricLoss settings: the production default and replays of the seed's V2.3 / V2.4."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # What geodiag recommends, and GeometricLoss's defaults: shifted sqrt (no bias on flat regions) at an eps whose
    # bias, at most sqrt(eps) per edge pixel, is far below fp32's resolution of a perimeter (the chain rule bounds
    # the gradient whatever eps is); sqrt-free anisotropy in normalised coordinates; normalised Sobel.
    "production": dict(stabilizer="shifted", eps=1e-10, aspect_formula="anisotropy", sobel="normalised"),
    # The seed's V2.3, in the seed's arithmetic: raw Sobel with zero padding, sqrt(clamp(s, min=1e-4)) for the
    # perimeter and for tr^2 - 4 det with moments in pixel coordinates.
    "v2.3": dict(stabilizer="clamp", eps=1e-4, aspect_formula="seed", sobel="seed"),
    # The seed's V2.4 "fix": the same with the clamp raised to 1e-2.
    "v2.4": dict(stabilizer="clamp", eps=1e-2, aspect_formula="seed", sobel="seed"),
}


def preset_kwargs(name: str) -> dict:
    """The keyword arguments of a preset; a clear error for an unknown name."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
