"""LR × batch (being written)."""

import dash
from dash import html

dash.register_page(__name__, path="/lr-batch", name="LR × batch", title="batchscope · LR × batch", order=5)

layout = html.Div([html.H1("LR × batch")])
