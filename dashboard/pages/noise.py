"""Noise scale (being written)."""

import dash
from dash import html

dash.register_page(__name__, path="/noise", name="Noise scale", title="batchscope · Noise scale", order=2)

layout = html.Div([html.H1("Noise scale")])
