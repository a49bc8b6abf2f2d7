"""Tradeoff (being written)."""

import dash
from dash import html

dash.register_page(__name__, path="/tradeoff", name="Tradeoff", title="batchscope · Tradeoff", order=3)

layout = html.Div([html.H1("Tradeoff")])
