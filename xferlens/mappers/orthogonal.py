"""``orthogonal``: Procrustes after centring, with one global scale.

``y = mean_y + s (x - mean_x) R`` where ``R`` (``d_src x d_tgt``) has orthonormal rows or
columns and maximises ``tr(R^T Xc^T Yc)``: ``R = U V^T`` from the SVD of the centred
cross-covariance, and ``s = sum(singular values) / |Xc|^2`` is the least-squares scale.

Different widths: ``R`` is then the semi-orthogonal ``d_src x d_tgt`` matrix (thin SVD).
It is exactly what ``scipy.linalg.orthogonal_procrustes`` returns on the two matrices
zero-padded to the same width, cut back to ``d_src x d_tgt``: a map to a wider model is an
isometric embedding of the source space; a map to a narrower one keeps the ``d_tgt``
source directions that best match the target and drops the rest.

Data-parallel (``distributed=True``), the moments are all-reduced, so every rank computes
the same SVD as one process on all the rows.
"""

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from xferlens.distributed import is_main
from xferlens.mappers.base import Mapper, MapperConfig, PairSource, register
from xferlens.mappers.moments import Moments


@dataclass
class OrthogonalConfig(MapperConfig):
    """``scale``: fit the global scale ``s`` (else 1)."""

    scale: bool = True
    batch_size: int = 4096


@register
class OrthogonalMapper(Mapper):
    kind = "orthogonal"
    is_linear = True
    config_class = OrthogonalConfig

    def __init__(self, d_src: int, d_tgt: int, config: OrthogonalConfig | None = None):
        super().__init__(d_src, d_tgt, config)
        self.register_buffer("mean_src", torch.zeros(d_src))
        self.register_buffer("mean_tgt", torch.zeros(d_tgt))
        self.register_buffer("rotation", torch.zeros(d_src, d_tgt))
        self.register_buffer("scale", torch.ones(()))

    def _map(self, x: Tensor) -> Tensor:
        return self.mean_tgt + self.scale * ((x - self.mean_src) @ self.rotation)

    @classmethod
    def fit(
        cls,
        train: PairSource,
        val: PairSource | None,
        config: OrthogonalConfig,
        *,
        progress: bool = True,
        distributed: bool = False,
    ):
        """``distributed=True``: ``train``/``val`` are this rank's parts (see ``fit_mapper``)."""
        t0 = time.perf_counter()
        m = Moments.of(
            train,
            batch_size=config.batch_size,
            progress=progress and is_main(),
            desc="procrustes: X^T Y",
            distributed=distributed,
        )
        u, s, vh = torch.linalg.svd(m.cov_xy, full_matrices=False)
        r = u @ vh
        scale = s.sum() / torch.trace(m.cov_xx) if config.scale else torch.tensor(1.0, dtype=torch.float64)
        mapper = cls(m.shift_x.numel(), m.shift_y.numel(), config)
        mapper.mean_src.copy_(m.mean_x.float())
        mapper.mean_tgt.copy_(m.mean_y.float())
        mapper.rotation.copy_(r.float())
        mapper.scale.copy_(scale.float())
        w, b = scale * r, m.mean_y - scale * (m.mean_x @ r)
        history = {
            "kind": cls.kind,
            "train_rows": m.n,
            "scale": float(scale),
            "train_mse": m.sse(w, b) / (m.n * m.shift_y.numel()),
            "seconds": time.perf_counter() - t0,
        }
        if val is not None:
            mv = Moments.of(
                val, batch_size=config.batch_size, shift=(m.shift_x, m.shift_y), distributed=distributed
            )
            history["val_rows"] = mv.n
            history["val_mse"] = mv.sse(w, b) / (mv.n * m.shift_y.numel())
        return mapper, history
