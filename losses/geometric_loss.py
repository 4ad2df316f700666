"""GeometricLoss: compactness and aspect shape priors for segmentation, safe in fp32, bf16 and fp16 training."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import geometry
from .stabilizers import SqrtStabilizer
from .taps import Tappable

ASPECT_FORMULAS = ("anisotropy", "seed")
REFERENCES = ("target", "prior")
REDUCTIONS = ("mean", "sum", "none")
# The weighted terms, in the order every log, table and tap list names them (tap "<term>.term", weight
# "<term>_weight", trainer log key "train_<term>"). Adding a term starts here.
GEOMETRIC_TERMS = ("compactness", "aspect")

# Descriptor values of the absolute prior: a disk (2D) or a ball (3D).
CIRCLE_PRIOR = {"compactness": 1.0, "anisotropy": 0.0, "seed": 1.0}


class GeometricLoss(Tappable, nn.Module):
    """Compactness and aspect penalties on soft segmentations, vectorised over batch and classes.

    Shapes: ``input`` [B, C, H, W] or [B, C, D, H, W], probabilities (or logits with ``softmax=True``);
    ``target`` either a label map [B, 1, *S] / [B, *S] of class indices (nnU-Net's format) or a one-hot
    tensor shaped like ``input``. Only the channels in ``classes`` are penalised.

    Terms, each ``weight * Huber(descriptor(pred) - reference)`` weighted by a smooth area ramp:
      - compactness: P^2 / (4 pi A) in 2D, S^3 / (36 pi V^2) in 3D (1 for a disk or ball). P and S sum
        sqrt(s), s = the sum of squared Sobel derivatives, through a sqrt stabiliser. ``sobel="normalised"``
        divides the kernel by its gain and pads by replication; ``sobel="seed"`` replays the seed's raw
        kernel with zero padding (s 64x larger in 2D, so the same eps is a different threshold).
      - aspect: anisotropy disc / tr^2 of the second central moments in normalised coordinates, with the
        sum-of-squares discriminant (sqrt-free, 2D and 3D). ``aspect_formula="seed"`` replays the seed's
        2D form: sqrt(clamp(tr^2 - 4 det)) in pixel units and the elongation sqrt(lambda_max / lambda_min).
    ``reference="target"`` compares with the label's own descriptor (multi-object images such as dataset
    501); ``"prior"`` with a circle. Images where the class is absent from the label get no geometric term.

    The defaults are the ``production`` preset: a shifted sqrt at eps 1e-10. Every stabiliser bounds the
    gradient with respect to the Sobel outputs by 1 whatever eps is (d sqrt(s)/d g = g / sqrt(s) and
    |g| <= sqrt(s)), so a small eps costs no stability in fp32, where these terms always run, while a large
    one biases the perimeter: ``clamp`` and ``additive`` add sqrt(eps) per flat pixel, ``shifted`` adds
    nothing on flat regions and under-reads an edge pixel by at most sqrt(eps). With ``clamp``, pixels
    below eps get no gradient. The seed's V2.3 / V2.4 are the presets ``v2.3`` / ``v2.4``.

    Numerics: the geometric terms are computed in fp32 (fp64 for fp64 input) with autocast disabled, using
    elementwise products and sums only (moments in pixel units overflow fp16 through einsum/matmul). Forward
    and backward never synchronise with the host. Empty or tiny predictions are faded out by a smoothstep
    ramp on the soft area (``min_area`` pixels), not by returning a detached zero or masking NaN.

    Taps (see ``register_tap``): the names in ``TAP_NAMES``, shaped [B, K, ...] with K = len(classes).
    """

    TAP_NAMES = (
        "probabilities",
        "area",
        "compactness.grad_mag_squared",
        "compactness.sqrt_input",
        "compactness.sqrt_output",
        "perimeter",
        "compactness",
        "compactness.term",
        "aspect.moments",
        "aspect.discriminant",
        "aspect.sqrt_input",
        "aspect.sqrt_output",
        "aspect",
        "aspect.term",
        "loss",
    )

    def __init__(
        self,
        classes: Sequence[int] = (1,),
        *,
        compactness_weight: float = 1.0,
        aspect_weight: float = 1.0,
        reference: str = "target",
        stabilizer: str = "shifted",
        eps: float = 1e-10,
        aspect_formula: str = "anisotropy",
        sobel: str = "normalised",
        softmax: bool = False,
        min_area: float = 16.0,
        huber_beta: float = 0.1,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.classes = tuple(int(c) for c in classes)
        if not self.classes:
            raise ValueError("classes must name at least one channel")
        for name, allowed, value in (
            ("reference", REFERENCES, reference),
            ("aspect_formula", ASPECT_FORMULAS, aspect_formula),
            ("sobel", geometry.SOBEL_FORMS, sobel),
            ("reduction", REDUCTIONS, reduction),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        for name, value in (("compactness_weight", compactness_weight), ("aspect_weight", aspect_weight),
                            ("min_area", min_area), ("huber_beta", huber_beta)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.compactness_weight = float(compactness_weight)
        self.aspect_weight = float(aspect_weight)
        self.reference = reference
        self.stabilizer = SqrtStabilizer(stabilizer, float(eps))
        self.aspect_formula = aspect_formula
        self.sobel = sobel
        self.softmax = softmax
        self.min_area = float(min_area)
        self.huber_beta = float(huber_beta)
        self.reduction = reduction

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GeometricLoss":
        """Build from a named preset (``production``, ``v2.3``, ``v2.4``), overriding any keyword."""
        from .presets import preset_kwargs

        return cls(**{**preset_kwargs(name), **overrides})

    def extra_repr(self) -> str:
        return (f"classes={self.classes}, compactness_weight={self.compactness_weight}, "
                f"aspect_weight={self.aspect_weight}, reference={self.reference!r}, "
                f"stabilizer={self.stabilizer}, aspect_formula={self.aspect_formula!r}, sobel={self.sobel!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        ndim = input.dim() - 2
        if ndim not in (2, 3):
            raise ValueError(f"input must be [B, C, H, W] or [B, C, D, H, W], got shape {tuple(input.shape)}")
        if max(self.classes) >= input.shape[1] or min(self.classes) < 0:
            raise ValueError(f"classes {self.classes} out of range for {input.shape[1]} channels")
        if self.aspect_formula == "seed" and ndim != 2 and self.aspect_weight > 0:
            raise ValueError("the seed's aspect formula is 2D only; use aspect_formula='anisotropy' in 3D")
        if self.reference == "target" and target is None:
            raise ValueError("reference='target' needs a target; pass one or use reference='prior'")

        with torch.autocast(device_type=input.device.type, enabled=False):
            probs = input.to(torch.promote_types(input.dtype, torch.float32))
            if self.softmax:
                probs = torch.softmax(probs, dim=1)
            probs = probs[:, list(self.classes)]
            batch, k = probs.shape[:2]
            self._emit("probabilities", probs)
            pred = self._describe(probs, emit=self._emit)
            gate = self._ramp(pred["area"])

            reference = None
            if target is not None:
                with torch.no_grad():
                    onehot = self._onehot(target, input, probs.dtype)
                    reference = self._describe(onehot, emit=None)
                    gate = gate * self._ramp(reference["area"])

            total = probs.new_zeros(batch, k)
            for term, weight in self.term_weights().items():
                if weight == 0:
                    continue
                if self.reference == "prior":
                    ref = torch.full_like(pred[term], CIRCLE_PRIOR[self._descriptor_kind(term)])
                else:
                    ref = reference[term]
                per_image = gate * F.smooth_l1_loss(pred[term], ref, reduction="none", beta=self.huber_beta)
                self._emit(f"{term}.term", per_image)
                total = total + weight * per_image
            loss = self._reduce(total)
            self._emit("loss", loss)
        return loss

    def term_weights(self) -> dict[str, float]:
        """Each of ``GEOMETRIC_TERMS`` and its weight (0: the term is off)."""
        return {term: getattr(self, f"{term}_weight") for term in GEOMETRIC_TERMS}

    # ------------------------------------------------------------------ parts
    def _descriptor_kind(self, term: str) -> str:
        return "compactness" if term == "compactness" else self.aspect_formula

    def _describe(self, probs: torch.Tensor, emit) -> dict[str, torch.Tensor]:
        """Area and descriptors of each mask of [B, K, *S]; ``emit`` (or None) receives the intermediates.

        Every emitted tensor is the one the computation goes on with, so a tap's gradient hook fires.
        """
        emit = emit or (lambda name, tensor: None)
        ndim = probs.dim() - 2
        size = geometry.spatial_sum(probs, ndim)
        emit("area", size)
        result = {"area": size}
        if self.compactness_weight > 0:
            s = geometry.grad_mag_squared(probs, ndim, self.sobel)
            emit("compactness.grad_mag_squared", s)
            sqrt_in = self.stabilizer.sqrt_input(s)
            emit("compactness.sqrt_input", sqrt_in)
            sqrt_out = torch.sqrt(sqrt_in)
            emit("compactness.sqrt_output", sqrt_out)
            measure = geometry.spatial_sum(self.stabilizer.finish(sqrt_out), ndim)
            emit("perimeter", measure)
            result["compactness"] = geometry.compactness(measure, size, ndim)
            emit("compactness", result["compactness"])
        if self.aspect_weight > 0:
            seed = self.aspect_formula == "seed"
            moments = geometry.central_moments(probs, size, ndim, normalized=not seed)
            emit("aspect.moments", moments)
            if seed:
                disc = geometry.seed_discriminant(moments)
                emit("aspect.discriminant", disc)
                # tr^2 - 4 det >= 0 exactly, but cancels to fp32 noise of either sign for near-isotropic shapes:
                # below -eps, sqrt(disc + eps) would be NaN. The floor at 0 leaves the seed's clamp presets as they are.
                sqrt_in = self.stabilizer.sqrt_input(disc.clamp(min=0.0, max=1e12))
                emit("aspect.sqrt_input", sqrt_in)
                sqrt_out = torch.sqrt(sqrt_in)
                emit("aspect.sqrt_output", sqrt_out)
                aspect = geometry.seed_elongation(self.stabilizer.finish(sqrt_out), moments)
            else:
                disc = geometry.anisotropy_discriminant(moments)
                emit("aspect.discriminant", disc)
                aspect = geometry.anisotropy(disc, moments)
            result["aspect"] = aspect
            emit("aspect", aspect)
        return result

    def _ramp(self, size: torch.Tensor) -> torch.Tensor:
        """Smoothstep from 0 at zero area to 1 at ``min_area`` pixels."""
        if self.min_area == 0:
            return torch.ones_like(size)
        t = (size / self.min_area).clamp(0.0, 1.0)
        return t * t * (3.0 - 2.0 * t)

    def _onehot(self, target: torch.Tensor, input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The target as masks of ``classes`` in ``dtype``: [B, K, *S]."""
        if target.shape == input.shape:
            return target.to(dtype)[:, list(self.classes)]
        labels = target[:, 0] if target.dim() == input.dim() else target
        if labels.shape != input.shape[:1] + input.shape[2:]:
            raise ValueError(f"target shape {tuple(target.shape)} does not match input {tuple(input.shape)}")
        return torch.stack([(labels == c) for c in self.classes], dim=1).to(dtype)

    def _reduce(self, per_image: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return per_image.mean()
        if self.reduction == "sum":
            return per_image.sum()
        return per_image
