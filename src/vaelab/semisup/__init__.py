"""Semi-supervised learning with VAEs (Kingma et al., 2014): M1, M2 and M1+M2 over label budgets.

- :mod:`vaelab.semisup.data`: MNIST with a class-balanced labeled subset, the rest unlabeled.
- :mod:`vaelab.semisup.m2`: M2 (``model=m2``) and M2 on a trained VAE's latent space (``model=m1m2``).
- :mod:`vaelab.semisup.m1`: M1, a classifier on a trained VAE's latent means
  (``python -m vaelab.semisup ckpt_path=...``).
- :mod:`vaelab.semisup.report`: test error per label budget and method over a sweep's seeds.
"""
