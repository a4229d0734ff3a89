"""Hessian-structure analyses built on :mod:`kfacbound.curvature`.

- :mod:`.rank`: numerical rank of H, H_O, H_F against the deep-linear-network formulas
  (Singh et al.).
- :mod:`.compare`: exact versus K-FAC top eigenvalues, eigenspace overlap, Frobenius error,
  per layer.
- :mod:`.structure`: Dissecting-Hessian structure across models (overlap, rank-1 ratio, E[a]
  alignment, outliers against C − 1), BatchNorm against no BatchNorm.
- :mod:`.spectra`: layer spectra metrics over training (top eigenvalue, trace, effective and stable
  rank, negative mass, SLQ density).
- :mod:`.plots`: the figures of the above.
"""
