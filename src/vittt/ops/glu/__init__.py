"""ViT³'s simplified-SwiGLU inner model ``F(x) = (x W1) ⊙ SiLU(x W2)``: ``composable`` (closed-form gradients, any
inner loss), ``fused`` (dot-product loss, hand-written backward), ``reference`` (autograd of the stated loss)."""
from .composable import swiglu_inner, swiglu_inner_grads, swiglu_ttt
from .fused import swiglu_ttt_fused

__all__ = ['swiglu_inner', 'swiglu_inner_grads', 'swiglu_ttt', 'swiglu_ttt_fused']
