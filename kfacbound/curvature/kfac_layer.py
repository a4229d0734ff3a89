"""One Kronecker-factored curvature block per layer: :class:`KronLayer`.

A Linear or Conv2d layer with weight W (out × in; a conv kernel reshaped to
out × (in_channels·kh·kw)) and bias b is written as W̃ = [W | b] and its parameters as
vec(W̃), row-major (see :mod:`kfacbound.curvature.layout`). K-FAC approximates the layer's
GGN block of the mean loss by

- ``homogeneous=True`` (default): G ⊗ Ã, with Ã = E[ã ãᵀ], ã = [a; 1] of size in + 1, acting on
  vec(W̃) directly: (G ⊗ Ã) vec(V) = vec(G V Ã) for row-major vec (Ã symmetric);
- ``homogeneous=False`` ("separate" bias): block-diagonal, G ⊗ A on vec(W) and G_bias on b
  (written in the same layout, i.e. the bias entries sit in the last column of W̃).

Eigen-structure (Martens & Grosse 2015): the eigenvalues of G ⊗ A are λ_i(G)·λ_j(A) with
eigenvectors u_i ⊗ v_j, so the top-k pairs are found from the two factor spectra alone
(O(k log k) with a heap) without forming the (out·in)² matrix.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from ..errors import KfacboundError

DENSE_LIMIT = 8192  # largest dimension to_dense() materialises (8192² float64 = 512 MiB)


def _sym_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric PSD factor in float64, descending, tiny negatives clamped to 0."""
    M = M.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    evals = evals.flip(0).clamp_min(0.0)
    return evals, evecs.flip(1)


@dataclass
class KronEig:
    """Top-k Kronecker eigenpairs of a layer: ``values`` (descending) and index ``pairs``.

    ``pairs[r] = (i, j)`` means eigenvalue λ_i(G)·λ_j(A) with eigenvector u_i ⊗ v_j (indices into
    the descending factor spectra). For a separate-bias layer, ``(i, -1)`` is the bias block's
    i-th eigenpair of G_bias. Materialise the vectors with :meth:`KronLayer.eigvecs`.
    """

    values: torch.Tensor
    pairs: list[tuple[int, int]]


@dataclass
class KronLayer:
    """K-FAC factors of one Linear/Conv2d layer of the model (module path ``name``).

    G (out × out) and A (d × d, d = in + 1 when ``homogeneous``) are float64. ``G_bias`` is set
    only for separate bias factors. ``weight_shape`` is the torch shape of the weight.
    """

    name: str
    module_type: str
    G: torch.Tensor
    A: torch.Tensor
    weight_shape: tuple[int, ...]
    bias: bool
    homogeneous: bool = True
    G_bias: torch.Tensor | None = None
    _eig: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.weight_shape = tuple(int(s) for s in self.weight_shape)
        if self.homogeneous and not self.bias:
            self.homogeneous = False
        if self.bias and not self.homogeneous and self.G_bias is None:
            raise KfacboundError(f"layer {self.name!r}: separate bias factors need G_bias")

    # ----------------------------------------------------------------- sizes and layout
    @property
    def out_dim(self) -> int:
        return self.weight_shape[0]

    @property
    def in_dim(self) -> int:
        """Columns of W (in_features, or in_channels·kh·kw), without the bias."""
        n = 1
        for s in self.weight_shape[1:]:
            n *= s
        return n

    @property
    def cols(self) -> int:
        """Columns of W̃: in_dim + 1 with a bias."""
        return self.in_dim + int(self.bias)

    @property
    def dim(self) -> int:
        """Number of parameters of the layer (length of vec(W̃))."""
        return self.out_dim * self.cols

    # ----------------------------------------------------------------- eigendecompositions
    def eig(self, which: str = "G") -> tuple[torch.Tensor, torch.Tensor]:
        """Cached float64 (eigenvalues descending, eigenvectors as columns) of G, A or G_bias."""
        if which not in self._eig:
            mat = {"G": self.G, "A": self.A, "G_bias": self.G_bias}[which]
            if mat is None:
                raise KfacboundError(f"layer {self.name!r} has no factor {which}")
            self._eig[which] = _sym_eigh(mat)
        return self._eig[which]

    # ----------------------------------------------------------------- products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(G ⊗ Ã) v (or the separate-bias block) for v = vec(W̃) in the layout of layout.py.

        ``v`` may also be a matrix of shape (dim, k) (k vectors as columns). Computed as
        G V Ã per vector, never forming the Kronecker product.
        """
        squeeze = v.ndim == 1
        V = v.to(torch.float64).reshape(self.dim, -1)
        k = V.shape[1]
        M = V.T.reshape(k, self.out_dim, self.cols)
        G = self.G.to(V.device)
        if self.homogeneous or not self.bias:
            out = G @ M @ self.A.to(V.device)
        else:
            out = torch.empty_like(M)
            out[:, :, :-1] = G @ M[:, :, :-1] @ self.A.to(V.device)
            out[:, :, -1] = M[:, :, -1] @ self.G_bias.to(V.device).T
        out = out.reshape(k, self.dim).T
        return out.reshape(-1) if squeeze else out

    def diag(self) -> torch.Tensor:
        """Diagonal of the block in layout order: diag(G)[o]·diag(Ã)[i]."""
        d = torch.outer(self.G.diagonal(), self.A.diagonal())
        if self.bias and not self.homogeneous:
            d = torch.cat([d, self.G_bias.diagonal()[:, None]], dim=1)
        return d.reshape(-1)

    def to_dense(self, max_dim: int = DENSE_LIMIT) -> torch.Tensor:
        """The dense (dim × dim) float64 block in layout order; refuses dim > ``max_dim``."""
        if self.dim > max_dim:
            raise KfacboundError(
                f"layer {self.name!r} has {self.dim} parameters; its dense K-FAC block would be "
                f"{self.dim}×{self.dim} (limit {max_dim}). Use matvec/topk, or raise max_dim."
            )
        if self.homogeneous or not self.bias:
            return torch.kron(self.G, self.A)
        dense = torch.zeros(self.out_dim, self.cols, self.out_dim, self.cols, dtype=torch.float64)
        dense[:, :-1, :, :-1] = torch.kron(self.G, self.A).reshape(
            self.out_dim, self.in_dim, self.out_dim, self.in_dim
        )
        dense[:, -1, :, -1] = self.G_bias
        return dense.reshape(self.dim, self.dim)

    # ----------------------------------------------------------------- top-k eigenpairs
    def topk(self, k: int) -> KronEig:
        """The k largest eigenvalues λ_i(G)·λ_j(A) and their index pairs, by a heap merge.

        Never forms anything larger than the factors. For separate bias factors the
        eigenvalues of G_bias join the candidates with j = -1.
        """
        if k < 1:
            raise KfacboundError("topk needs k >= 1")
        k = min(k, self.dim)
        lg = self.eig("G")[0].tolist()
        la = self.eig("A")[0].tolist()
        heap: list[tuple[float, int, int]] = [(-lg[0] * la[0], 0, 0)]
        seen = {(0, 0)}
        bias_vals = self.eig("G_bias")[0].tolist() if (self.bias and not self.homogeneous) else []
        b = 0
        values: list[float] = []
        pairs: list[tuple[int, int]] = []
        while len(values) < k:
            top_kron = -heap[0][0] if heap else -1.0
            if b < len(bias_vals) and bias_vals[b] > top_kron:
                values.append(bias_vals[b])
                pairs.append((b, -1))
                b += 1
                continue
            neg, i, j = heapq.heappop(heap)
            values.append(-neg)
            pairs.append((i, j))
            for ni, nj in ((i + 1, j), (i, j + 1)):
                if ni < len(lg) and nj < len(la) and (ni, nj) not in seen:
                    seen.add((ni, nj))
                    heapq.heappush(heap, (-lg[ni] * la[nj], ni, nj))
        return KronEig(torch.tensor(values, dtype=torch.float64), pairs)

    def eigvecs(self, pairs: list[tuple[int, int]] | KronEig) -> torch.Tensor:
        """The eigenvectors u_i ⊗ v_j for ``pairs``, as columns of a (dim × k) float64 matrix."""
        if isinstance(pairs, KronEig):
            pairs = pairs.pairs
        UG = self.eig("G")[1]
        UA = self.eig("A")[1]
        out = torch.zeros(self.out_dim, self.cols, len(pairs), dtype=torch.float64)
        for r, (i, j) in enumerate(pairs):
            if j == -1:
                out[:, -1, r] = self.eig("G_bias")[1][:, i]
            elif self.homogeneous or not self.bias:
                out[:, :, r] = torch.outer(UG[:, i], UA[:, j])
            else:
                out[:, :-1, r] = torch.outer(UG[:, i], UA[:, j])
        return out.reshape(self.dim, len(pairs))

    # ----------------------------------------------------------------- conversions
    def to_separate(self) -> KronLayer:
        """This layer with separate bias factors (drop Ã's bias row/column; G_bias = G·Ã[-1,-1])."""
        if not self.homogeneous:
            return self
        return KronLayer(self.name, self.module_type, self.G, self.A[:-1, :-1], self.weight_shape,
                         True, homogeneous=False, G_bias=self.G * self.A[-1, -1])
