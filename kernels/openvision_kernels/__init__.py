"""Pallas kernels for openvision-max (flash attention for every sequence the model family makes).

Installed under the distinct import name `openvision_kernels`, so nothing clashes with the unrelated PyPI
distribution called `kernels`. The kernels themselves arrive with the flash-attention work; until then
`attention: dot_product` (and `cudnn` on NVIDIA GPUs) are the implementations the config accepts.
"""
