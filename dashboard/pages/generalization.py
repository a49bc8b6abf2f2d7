"""Generalization (being written)."""

from dash import html

from dashboard.components import register_page

register_page(__name__, path="/generalization", name="Generalization", title="batchscope · Generalization", order=4)

layout = html.Div([html.H1("Generalization")])
