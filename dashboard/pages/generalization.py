"""Generalization (being written)."""

import dash
from dash import html

dash.register_page(__name__, path="/generalization", name="Generalization", title="batchscope · Generalization", order=4)

layout = html.Div([html.H1("Generalization")])
