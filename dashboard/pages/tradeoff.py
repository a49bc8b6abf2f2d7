"""Tradeoff (being written)."""

from dash import html

from dashboard.components import register_page

register_page(__name__, path="/tradeoff", name="Tradeoff", title="batchscope · Tradeoff", order=3)

layout = html.Div([html.H1("Tradeoff")])
