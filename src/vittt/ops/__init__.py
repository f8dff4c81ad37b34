"""The inner-learning math of TTT layers: pure functions on tensors, no module state."""
from .gelu_linear import gelu_linear
from .dwconv import (DWCONV_BACKENDS, dwconv_backend, dwconv_inner_grad, dwconv_per_sample, dwconv_ttt,
                     dwconv_ttt_fused, get_dwconv_backend)
from .inner_loss import INNER_LOSSES, DotProductLoss, InnerLoss, MSELoss, get_inner_loss
from .normalize import soft_normalize
from .swiglu import swiglu_inner, swiglu_inner_grads, swiglu_ttt
from .swiglu_fused import swiglu_ttt_fused
from .minibatch import (gelu_grad, ln_l2_grad, ln_l2_grad_parts, minibatch_coefficients, ttt_linear_scan, ttt_mlp_scan,
                        ttt_scan, ttt_scan_fused)
