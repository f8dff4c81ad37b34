"""Interpretability tools (``vittt explain``): effective receptive fields of the last feature map (:mod:`.erf`) and
gradient × input token importance of a class (:mod:`.tokens`). Not an engine task: nothing to train."""
from .erf import effective_receptive_field, erf_spread, log_scaled, plot_erf, run_erf
from .tokens import plot_tokens, pool_to_tokens, run_tokens, token_importance

__all__ = ['effective_receptive_field', 'erf_spread', 'log_scaled', 'plot_erf', 'run_erf', 'token_importance',
           'pool_to_tokens', 'plot_tokens', 'run_tokens']
