"""The memory-efficient DenseNet engine as PyTorch operators.

A plain dense block concatenates all earlier maps for every layer, and autograd keeps every
concatenation and every BN output alive until backward, so training memory grows quadratically
with depth. Here a whole block is one registered operator with one shared feature buffer and
BN-ReLU recomputed in backward (memory linear in depth), and so are the stem, the transitions
and the final BN-ReLU. The package, from the top:

=================  ===========================================================================
module             owns
=================  ===========================================================================
``modules``        from ``nn.Module`` s to ops: parameters and BN settings in, running
                   statistics updated, dropout masks drawn, hooks respected
``library``        every ``torch.library`` registration of the block, stem and transition ops:
                   definitions, fake implementations, autograd, autocast and FLOP formulas
``block``          the dense block's forward and backward math (:class:`~.block.BlockSpec`)
``bn``             the math of BN-ReLU and what follows it: stem, transitions, norm5
``elementwise``    the fused element-wise passes as ops with torch-op defaults, their CPU and
                   CUDA kernels registered per dispatch key
``cpu``, ``csrc``  the C kernels (``csrc/kernels.c``), compiled on first use, and their wrappers
``cuda``           the Triton kernels and the table of their launches
``checks``         the kernels' argument checks (shared by both wrappers)
``buffers``        the pool of large CPU buffers
``rows``           (N*H*W, C) row matrices and the 1x1 convolution as products
=================  ===========================================================================

:mod:`densenet.backends` holds the settings (C kernels, Triton, pool, huge pages).
"""

from . import library  # noqa: F401  (registers the ops)
from .buffers import pooled_bytes, release_buffers
from .modules import (bn_relu_forward, bn_relu_maxpool_forward, children_forward,
                      dense_block_forward, features_forward, inference_layout,
                      note_structure_change, transition_forward)

__all__ = ["bn_relu_forward", "bn_relu_maxpool_forward", "children_forward", "dense_block_forward",
           "features_forward", "inference_layout", "note_structure_change", "pooled_bytes",
           "release_buffers", "transition_forward"]
