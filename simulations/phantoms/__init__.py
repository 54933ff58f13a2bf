"""Synthetic hospitals: phantom images written as site folders, for tests, demos and benchmarks.

- `sites.py`: `make_phantom_sites`, 2D/3D classification and segmentation phantoms;
- `organ.py`: the organ-3d phantom (several structures in one volume).
"""
