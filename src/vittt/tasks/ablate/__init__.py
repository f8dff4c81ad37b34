"""ViT³'s ablation tables (spec A.6): the rows as switches of ``vit3_design_small`` with the paper's numbers
(:mod:`.tables`) and the runner that re-measures and re-trains them (:mod:`.run`, ``vittt ablate``)."""
from .run import (ABLATE_RECIPE, BENCH, DEFAULT_TRAIN_SUBSET, QUICK, base_label, bench_rows, compare_row, count_row,
                  plot_ablation, render_report, row_recipe, row_slug, run_ablation, select_rows, train_row)
from .tables import BASE_MODEL, TABLE_TITLES, TABLES, Row, get_table

__all__ = ['ABLATE_RECIPE', 'BENCH', 'DEFAULT_TRAIN_SUBSET', 'QUICK', 'base_label', 'bench_rows', 'compare_row',
           'count_row', 'plot_ablation', 'render_report', 'row_recipe', 'row_slug', 'run_ablation', 'select_rows',
           'train_row', 'BASE_MODEL', 'TABLE_TITLES', 'TABLES', 'Row', 'get_table']
