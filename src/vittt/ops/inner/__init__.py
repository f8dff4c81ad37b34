"""Every inner model (ViT³'s design space and Vision-TTT's TTT-Linear / TTT-MLP) as gradient / step / apply
(:mod:`.functions`) and the inner trainings composed from them (:mod:`.train`); ``reference`` holds their plain autograd
references (tests)."""
from .functions import (FC, GLU, INNER_FUNCTIONS, MLP, TTTMLP, Conv3x3, DWConv, InnerFunction, SiLUFC, SwiGLU,
                        TTTLinear, gelu_grad, layer_norm, layer_norm_backward, make_inner_function, silu_grad)
from .train import check_schedule, inner_fit, inner_stats, inner_step, inner_ttt

__all__ = ['FC', 'GLU', 'INNER_FUNCTIONS', 'MLP', 'TTTMLP', 'Conv3x3', 'DWConv', 'InnerFunction', 'SiLUFC', 'SwiGLU',
           'TTTLinear', 'gelu_grad', 'layer_norm', 'layer_norm_backward', 'make_inner_function', 'silu_grad',
           'check_schedule', 'inner_fit', 'inner_stats', 'inner_step', 'inner_ttt']
