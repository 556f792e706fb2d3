"""Reusable layer types that methods put into a model, and the way back to plain modules.

- `series`: kernels generated from cosine / Chebyshev series coefficients (`SeriesKernel`; ApproxConv);
- `fgf`: fractional Gaussian filters (`FractionalGaussianKernel`, its fit, model.pt meta; FGFP);
- `quant`: fake quantisation of weights and layer inputs (`FakeQuantWeight`, `ActivationFakeQuant`);
- `masks`: unstructured-pruning masks on `torch.nn.utils.prune` (AUP), and their sparse storage size;
- `deployable(model)`: a plain copy of any model (kernels generated, masks made permanent, weight
  fake-quant baked; input fake-quant kept, so outputs stay equal); `clone(model)`: a deep copy that also
  works after a training forward with prune masks.

This package depends on torch and `compress.CompressError` only: never on methods, the pipeline or
measurement, which all build on it.
"""
from compress.layers import fgf, masks, quant, series
from compress.layers.deploy import bake_parametrized, clone, deployable

__all__ = ["fgf", "masks", "quant", "series", "bake_parametrized", "clone", "deployable"]
