"""Mini-batch TTT (TTT-Linear / TTT-MLP, Vision-TTT): ``composable`` (the dual-form scan, both mini-batch rules),
``fused`` (the same function with far fewer, larger ops), ``reference`` (token by token, autograd)."""
from .composable import (gelu_grad, layer_norm, ln_l2_grad, ln_l2_grad_parts, minibatch_coefficients, ttt_linear_scan,
                         ttt_mlp_scan, ttt_scan)
from .fused import ttt_scan_fused

__all__ = ['gelu_grad', 'layer_norm', 'ln_l2_grad', 'ln_l2_grad_parts', 'minibatch_coefficients', 'ttt_linear_scan',
           'ttt_mlp_scan', 'ttt_scan', 'ttt_scan_fused']
