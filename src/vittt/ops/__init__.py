"""The inner-learning math of TTT layers: pure functions on tensors, no module state.

One folder per op, each with ``composable`` (closed-form gradient, step, apply, differentiable by autograd),
``fused`` (the hand-optimised autograd function, where a profile says it pays) and ``reference`` (autograd of the
stated loss, for tests), one signature across the three: ``glu`` (ViT³'s simplified SwiGLU), ``dwconv`` (ViT³'s
depth-wise conv), ``scan`` (Vision-TTT's mini-batch TTT-Linear / TTT-MLP), ``inner`` (every inner model of the
design space as gradient / step / apply, and the trainings composed from them), ``loss`` (the inner losses and
their closed-form gradients). ``normalize`` (the soft gradient normalisation) and ``precision`` are shared.
"""
from .gelu_linear import gelu_linear
from .dwconv import (DWCONV_BACKENDS, dwconv_backend, dwconv_inner_grad, dwconv_per_sample, dwconv_ttt,
                     dwconv_ttt_fused, get_dwconv_backend)
from .loss import INNER_LOSSES, DotProductLoss, InnerLoss, MAELoss, MSELoss, RMSELoss, SmoothL1Loss, get_inner_loss
from .normalize import soft_normalize
from .glu import swiglu_inner, swiglu_inner_grads, swiglu_ttt, swiglu_ttt_fused
from .scan import (gelu_grad, ln_l2_grad, ln_l2_grad_parts, minibatch_coefficients, ttt_linear_scan, ttt_mlp_scan,
                   ttt_scan, ttt_scan_fused)
