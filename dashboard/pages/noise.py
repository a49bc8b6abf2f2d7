"""Noise scale (being written)."""

from dash import html

from dashboard.components import register_page

register_page(__name__, path="/noise", name="Noise scale", title="batchscope · Noise scale", order=2)

layout = html.Div([html.H1("Noise scale")])
