"""LR × batch (being written)."""

from dash import html

from dashboard.components import register_page

register_page(__name__, path="/lr-batch", name="LR × batch", title="batchscope · LR × batch", order=5)

layout = html.Div([html.H1("LR × batch")])
