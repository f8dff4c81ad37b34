"""ViT³'s depth-wise k×k conv inner model: ``composable`` (closed-form gradient, any inner loss, the backend switch),
``fused`` (dot-product loss, hand-written backward), ``reference`` (autograd of the stated loss)."""
from .composable import (DWCONV_BACKENDS, dwconv_backend, dwconv_inner_grad, dwconv_per_sample, dwconv_ttt,
                         get_dwconv_backend, stepped_kernel)
from .fused import dwconv_ttt_fused

__all__ = ['DWCONV_BACKENDS', 'dwconv_backend', 'dwconv_inner_grad', 'dwconv_per_sample', 'dwconv_ttt',
           'dwconv_ttt_fused', 'get_dwconv_backend', 'stepped_kernel']
